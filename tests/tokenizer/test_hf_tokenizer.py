"""Our checkpoints' tokenizer loads in transformers' AutoTokenizer with no glue, as Kimi's releases do: the checkpoint
ships ``tokenization_kimi.py`` and ``tokenizer_config.json`` names it in ``auto_map``. transformers' tokenizer is
compared with k2ray's KimiTokenizer (the one the k2ray tests hold to the original Kimi tokenizer) on a corpus: the
demo's training chats, Unicode, special-token strings, pathological runs; and its chat template with k2ray's."""

from __future__ import annotations

import json
import random

import pytest
from transformers import AutoTokenizer

from k2ray.checkpoint.builtin import DEMO_DIR
from k2ray.tokenizer import ChatTemplate, KimiTokenizer
from k2ray.tokenizer.tiny import TOKENIZER_FILES, write_tokenizer_files
from k2ray.tokenizer.tokenizer import K2_PAT_STR


def _corpus() -> list[str]:
    from k2ray.demo.corpus import make_train_dialogs

    rng = random.Random(0)
    texts = ["", "Hello world", "What's the weather in Paris?", "  leading and trailing  ", "\n\n\t x \r\n y",
             "中文分词测试：北京的天气。", "Émile façade naïve — ü ß", "12345678 3.14159 1e-9", "emoji 🙂👍🏽 ok",
             "<|im_end|> <think>plan</think> <|tool_calls_section_begin|> [BOS]", "<|reserved_token_2100|>",
             "a" * 30_000 + " b", " " * 26_000 + "x", "ab" * 13_000, "I'M HERE'S THEY'LL we'd"]
    for d in make_train_dialogs(40, seed=1):
        texts.extend(json.dumps(m, ensure_ascii=False) for m in d.messages)
    texts.extend("".join(chr(rng.randrange(32, 0x3000)) for _ in range(rng.randrange(1, 200))) for _ in range(50))
    return texts


@pytest.fixture(scope="module", params=["make-tiny", "demo", "widened"])
def model_dir(request, tmp_path_factory):
    if request.param == "demo":
        return DEMO_DIR
    d = tmp_path_factory.mktemp(request.param)
    write_tokenizer_files(d, base_vocab=4096 if request.param == "widened" else None)
    return d


def test_checkpoint_files_name_the_tokenizer_class(model_dir):
    for name in TOKENIZER_FILES:
        assert (model_dir / name).is_file(), name
    cfg = json.loads((model_dir / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "TikTokenTokenizer"
    assert cfg["auto_map"] == {"AutoTokenizer": ["tokenization_kimi.TikTokenTokenizer", None]}


def test_auto_tokenizer_encodes_like_k2ray(model_dir):
    hf = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=True)
    ours = KimiTokenizer.from_dir(model_dir)
    assert type(hf).__name__ == "TikTokenTokenizer"
    assert len(hf) == ours.vocab_size
    assert (hf.eos_token, hf.bos_token, hf.pad_token) == (ours.eos_token, ours.bos_token, ours.pad_token)
    assert hf.convert_tokens_to_ids(hf.eos_token) == ours.eos_token_id
    for text in _corpus():
        ids = hf.encode(text, add_special_tokens=False)
        assert ids == ours.encode(text, allow_special=True), text[:80]
        assert hf.decode(ids) == ours.decode(ids), text[:80]
    assert hf.decode(ours.encode("<think>x</think>ok", allow_special=True), skip_special_tokens=True) == "xok"


def test_chat_template_through_transformers_matches_k2ray(model_dir):
    hf = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=True)
    template = ChatTemplate.from_dir(model_dir)
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Get the weather.",
                                               "parameters": {"type": "object",
                                                              "properties": {"city": {"type": "string"}}}}}]
    chats = [
        [{"role": "user", "content": "What is 12 * 7?"}],
        [{"role": "system", "content": "You are Kimi, an AI assistant created by Moonshot AI."},
         {"role": "user", "content": "What's the weather like in Beijing today? Use the tool to check."},
         {"role": "assistant", "content": "", "reasoning_content": "Look it up.",
          "tool_calls": [{"id": "functions.get_weather:0", "type": "function",
                          "function": {"name": "get_weather", "arguments": "{\"city\": \"Beijing\"}"}}]},
         {"role": "tool", "tool_call_id": "functions.get_weather:0", "content": "{\"weather\": \"Sunny\"}"}],
    ]
    for messages in chats:
        ids = hf.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=True,
                                     return_dict=False)
        assert ids == template.encode(messages, tools=tools), messages[-1]


def test_module_keeps_the_k2_split_pattern():
    """The shipped module stands alone (no k2ray import where it runs), so its pattern is a copy: the same one."""
    from k2ray.tokenizer.tiny import DATA_DIR

    namespace: dict = {}
    source = (DATA_DIR and open(f"{DATA_DIR}/tokenization_kimi.py").read())
    assert "import k2ray" not in source and "from k2ray" not in source
    exec(compile(source, "tokenization_kimi.py", "exec"), namespace)
    assert namespace["K2_PATTERN"] == K2_PAT_STR


def test_save_pretrained_round_trip(tmp_path):
    hf = AutoTokenizer.from_pretrained(DEMO_DIR, trust_remote_code=True)
    hf.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path, trust_remote_code=True)
    text = "What's the weather in Paris? <|im_end|>"
    assert again.encode(text, add_special_tokens=False) == hf.encode(text, add_special_tokens=False)


def test_auto_config_reads_the_checkpoints(tmp_path, monkeypatch):
    """The tiny K2 checkpoint's config.json names its own configuration_deepseek.py in auto_map (transformers has no
    kimi_k2), as in Kimi's K2 releases; the demo is Kimi K2.5, which transformers reads natively (``kimi_k25`` with a
    DeepSeek-V3 text config). Both tokenizers load through tokenization_kimi.py."""
    from transformers import AutoConfig

    from k2ray.checkpoint.builtin import resolve_model

    monkeypatch.setenv("K2RAY_CACHE_DIR", str(tmp_path))
    from pathlib import Path

    import k2ray.checkpoint.tiny as tiny
    from k2ray.tokenizer.tiny import DATA_DIR

    tiny_dir = resolve_model("k2ray-tiny")
    assert (tiny_dir / "configuration_deepseek.py").read_bytes() == (
        Path(tiny.__file__).parent / "data" / "configuration_deepseek.py").read_bytes()
    cfg = AutoConfig.from_pretrained(tiny_dir, trust_remote_code=True)
    assert cfg.model_type == "kimi_k2" and type(cfg).__name__ == "DeepseekV3Config"
    demo = AutoConfig.from_pretrained(DEMO_DIR)
    assert demo.model_type == "kimi_k25" and type(demo.text_config).__name__ == "DeepseekV3Config"
    for c in (cfg, demo.text_config):
        assert (c.hidden_size, c.n_routed_experts, c.kv_lora_rank) == (256, 32, 64)
    for d in (DEMO_DIR, tiny_dir):
        # The shipped modules are the package's own copies (the demo's were copied in when it was written).
        assert (d / "tokenization_kimi.py").read_bytes() == (Path(DATA_DIR) / "tokenization_kimi.py").read_bytes()
        tok = AutoTokenizer.from_pretrained(d, trust_remote_code=True)
        assert tok.encode("Hi", add_special_tokens=False) == KimiTokenizer.from_dir(d).encode("Hi")
