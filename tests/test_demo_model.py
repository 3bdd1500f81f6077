"""The shipped ``k2ray-demo`` checkpoint: exactly the Kimi K2 format, and it thinks and calls tools.

Greedy decoding through ``k2ray.LLM`` (local executor): "What's the weather in Paris?" with the two demo tools
declared gives a ``get_weather`` call with arguments ``{"city": "Paris"}`` and a think block; after the tool result the
final answer states it. (The checkpoint is produced by ``k2ray train-demo``, ``k2ray/demo/``.)
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import k2ray

DEMO = Path(k2ray.__file__).resolve().parent / "assets" / "k2ray-demo"

# ------------------------------------------------------------------------------------------------- format
def _tensors() -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = json.loads((DEMO / "model.safetensors.index.json").read_text())
    out: dict[str, torch.Tensor] = {}
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) == 2
    for shard in shards:
        part = load_file(str(DEMO / shard))
        assert {n for n, s in index["weight_map"].items() if s == shard} == set(part)
        out.update(part)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in out.values())
    return out


def test_demo_files_are_k25_format():
    from k2ray.checkpoint.tiny import QUANTIZATION_CONFIG, tiny_k25_config
    from k2ray.demo.train import DEMO_MEDIA_PROC_CFG
    from k2ray.tokenizer.tiny import DATA_DIR, K25_CHAT_TEMPLATE, TOKENIZER_FILES

    for name in ("config.json", "generation_config.json", "model.safetensors.index.json", "README.md",
                 "preprocessor_config.json", *TOKENIZER_FILES):
        assert (DEMO / name).is_file(), name
    top = json.loads((DEMO / "config.json").read_text())
    assert top == tiny_k25_config()  # the tiny shape with Kimi K2.5's keys and values
    assert top["model_type"] == "kimi_k25" and top["architectures"] == ["KimiK25ForConditionalGeneration"]
    assert top["quantization_config"] == QUANTIZATION_CONFIG
    config = top["text_config"]
    qc = top["quantization_config"]
    assert qc["format"] == "pack-quantized" and qc["quant_method"] == "compressed-tensors"
    assert qc["config_groups"]["group_0"]["weights"]["num_bits"] == 4
    assert qc["config_groups"]["group_0"]["weights"]["group_size"] == 32
    assert json.loads((DEMO / "preprocessor_config.json").read_text()) == {"media_proc_cfg": DEMO_MEDIA_PROC_CFG}
    gen = json.loads((DEMO / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [config["bos_token_id"] + 1, config["bos_token_id"] + 2]
    for name in TOKENIZER_FILES:  # byte for byte the package's tokenizer files and its K2.5 chat template
        src = K25_CHAT_TEMPLATE if name == "chat_template.jinja" else name
        assert (DEMO / name).read_bytes() == (Path(DATA_DIR) / src).read_bytes(), name

    t = _tensors()
    vision = {n: v for n, v in t.items() if n.startswith(("vision_tower.", "mm_projector."))}
    assert vision and all(v.dtype == torch.bfloat16 for v in vision.values())
    assert "vision_tower.encoder.blocks.0.wqkv.weight" in vision and "mm_projector.proj.0.weight" in vision
    t = {n.removeprefix("language_model."): v for n, v in t.items() if n.startswith("language_model.")}
    h, i_dim, e = config["hidden_size"], config["moe_intermediate_size"], config["n_routed_experts"]
    moe_layers = range(config["first_k_dense_replace"], config["num_hidden_layers"])
    expected_expert = set()
    for layer in moe_layers:
        for x in range(e):
            for proj, shape in (("gate_proj", (i_dim, h)), ("up_proj", (i_dim, h)), ("down_proj", (h, i_dim))):
                base = f"model.layers.{layer}.mlp.experts.{x}.{proj}"
                packed, scale, wshape = t[base + ".weight_packed"], t[base + ".weight_scale"], t[base + ".weight_shape"]
                assert packed.dtype == torch.int32 and tuple(packed.shape) == (shape[0], shape[1] // 8)
                assert scale.dtype == torch.bfloat16 and tuple(scale.shape) == (shape[0], shape[1] // 32)
                assert wshape.dtype == torch.int32 and wshape.tolist() == list(shape)
                expected_expert |= {base + s for s in (".weight_packed", ".weight_scale", ".weight_shape")}
        assert t[f"model.layers.{layer}.mlp.gate.e_score_correction_bias"].dtype == torch.float32
        assert t[f"model.layers.{layer}.mlp.gate.weight"].shape == (e, h)
        assert f"model.layers.{layer}.mlp.shared_experts.down_proj.weight" in t
    assert expected_expert <= set(t)
    others = set(t) - expected_expert
    for name in others:
        want = torch.float32 if name.endswith("e_score_correction_bias") else torch.bfloat16
        assert t[name].dtype == want, name
    assert not any(".experts." in n and n.endswith(".weight") for n in t)  # no dense routed experts
    assert "model.layers.0.mlp.gate_proj.weight" in t and "lm_head.weight" in t
    assert t["model.embed_tokens.weight"].shape == (config["vocab_size"], h)
    # a trained model, not the random-weight tiny one: routed experts use the whole INT4 range
    from k2ray.checkpoint.int4 import unpack_int4

    q = unpack_int4(t["model.layers.1.mlp.experts.0.gate_proj.weight_packed"])
    assert int(q.min()) == -8 or int(q.max()) == 7


# ------------------------------------------------------------------------------------------------- behaviour
@pytest.fixture(scope="module")
def demo(train_demo):
    from k2ray import LLM, SamplingParams
    from k2ray.tokenizer import ChatTemplate

    llm = LLM(model=str(DEMO))
    ct = ChatTemplate.from_dir(DEMO)
    tok = ct.tokenizer
    stop = set(json.loads((DEMO / "generation_config.json").read_text())["eos_token_id"])
    params = SamplingParams(temperature=0.0, max_tokens=80, skip_special_tokens=False)

    def generate(conversations: list[list[dict]]) -> list[str]:
        outs = llm.generate([ct.encode(m, tools=train_demo.TOOLS, add_generation_prompt=True) for m in conversations],
                            params)
        texts = []
        for o in outs:
            assert o.outputs[0].finish_reason == "stop", tok.decode(o.outputs[0].token_ids)
            texts.append(tok.decode([t for t in o.outputs[0].token_ids if t not in stop]))
        return texts

    yield generate
    llm.shutdown()


def _assistant_turn(parsed) -> dict:
    return {"role": "assistant", "content": parsed.content, "reasoning_content": parsed.reasoning_content,
            "tool_calls": parsed.tool_calls}


def test_weather_tool_call_and_answer(demo):
    from k2ray.tokenizer.parsers import parse_output

    weather = [{"role": "user", "content": "What's the weather in Paris?"}]
    calc = [{"role": "user", "content": "What is 47 * 23?"}]
    direct = [{"role": "user", "content": "What is the capital of Japan?"}]
    first = demo([weather, calc, direct])

    p = parse_output(first[0])
    assert p.reasoning_content.strip(), first[0]
    assert "Paris" in p.reasoning_content
    assert len(p.tool_calls) == 1, first[0]
    call = p.tool_calls[0]
    assert call["id"] == "functions.get_weather:0" and call["type"] == "function"
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}

    pc = parse_output(first[1])
    assert len(pc.tool_calls) == 1 and pc.tool_calls[0]["function"]["name"] == "calculator", first[1]
    assert json.loads(pc.tool_calls[0]["function"]["arguments"]) == {"expression": "47 * 23"}

    pd = parse_output(first[2])
    assert not pd.tool_calls and "Tokyo" in pd.content and pd.reasoning_content.strip(), first[2]

    weather += [_assistant_turn(p), {"role": "tool", "tool_call_id": call["id"],
                                     "content": json.dumps({"city": "Paris", "temperature_c": 21,
                                                            "condition": "sunny"})}]
    calc += [_assistant_turn(pc), {"role": "tool", "tool_call_id": pc.tool_calls[0]["id"],
                                   "content": json.dumps({"result": 1081})}]
    final = demo([weather, calc])
    fw = parse_output(final[0])
    assert not fw.tool_calls and fw.reasoning_content.strip(), final[0]
    assert "21" in fw.content and "sunny" in fw.content and "Paris" in fw.content, final[0]
    fc = parse_output(final[1])
    assert not fc.tool_calls and fc.content.strip(), final[1]  # whether it copies the result: the next test


def test_calculator_results_are_restated(demo):
    """After a calculator result the final answer states it. The model card's figure on held-out result shapes is
    62.5%: results of three and four digits are two number tokens, and the toy often gets the second one wrong. This
    guards the rate on the demo's own result shape, 20 fixed expressions (greedy: 13 right when it was trained)."""
    from k2ray.demo.corpus import CALC_THINK
    from k2ray.tokenizer.parsers import parse_output

    convs, want = [], []
    for i in range(20):
        a, b, sym = 12 + 4 * i, 3 + 5 * i, "+-*"[i % 3]
        a, b = (b, a) if sym == "-" and b > a else (a, b)
        r = eval(f"{a} {sym} {b}")
        call = {"id": "functions.calculator:0", "type": "function",
                "function": {"name": "calculator", "arguments": json.dumps({"expression": f"{a} {sym} {b}"})}}
        convs.append([{"role": "user", "content": f"What is {a} {sym} {b}?"},
                      {"role": "assistant", "content": "", "reasoning_content": CALC_THINK.format(a=a, sym=sym, b=b),
                       "tool_calls": [call]},
                      {"role": "tool", "tool_call_id": call["id"], "content": json.dumps({"result": r})}])
        want.append(str(r))
    right = sum(w in parse_output(t).content.replace(".", " ").split() for w, t in zip(want, demo(convs)))
    assert right >= 12, right


@pytest.fixture(scope="module")
def chat():
    """``LLM.chat`` on the demo, greedy: (messages, tools) -> the parsed assistant message and its finish reason."""
    from k2ray import LLM, SamplingParams

    llm = LLM(model=str(DEMO))
    params = SamplingParams(temperature=0.0, max_tokens=120)

    def run(conversations: list[list[dict]], tools=None) -> list[tuple[dict, str]]:
        outs = []
        for c in conversations:  # one call per conversation: each may declare its own tools
            (res,) = llm.chat(c, params, tools=tools)
            outs.append((res.messages[0], res.finish_reasons[0]))
        return outs

    yield run
    llm.shutdown()


def test_tool_results_of_any_shape_are_read(chat, train_demo):
    """The issue's result shapes: the final answer states what the tool returned, or its error."""
    ask = [{"role": "user", "content": "What's the weather in Paris?"}]
    ((first, reason),) = chat([ask], train_demo.TOOLS)
    assert reason == "tool_calls", first
    call = first["tool_calls"][0]
    shapes = [({"weather": "Sunny"}, ["sunny"]), ({"weather": "Sunny", "temp_c": 21}, ["sunny", "21"]),
              ({"error": "city not found"}, ["city not found"]),
              ({"city": "Paris", "temperature_c": 21, "condition": "sunny"}, ["sunny", "21"])]
    convs = [ask + [first, {"role": "tool", "tool_call_id": call["id"], "content": json.dumps(r)}] for r, _ in shapes]
    for (msg, reason), (result, want) in zip(chat(convs, train_demo.TOOLS), shapes):
        assert reason == "stop" and not msg.get("tool_calls"), (result, msg)
        assert all(w in msg["content"].lower() for w in want), (result, msg)


def test_direct_answers_without_tools(chat):
    """No tools declared: arithmetic is answered directly; the reasoning plans instead of repeating the answer; the
    model card's comparison question gets the right number."""
    outs = chat([[{"role": "user", "content": "What is 12 * 7?"}],
                 [{"role": "user", "content": "What is the capital of France?"}],
                 [{"role": "user", "content": "which one is bigger, 9.11 or 9.9? think carefully."}]])
    (calc, r1), (capital, r2), (compare, r3) = outs
    assert r1 == "stop" and not calc.get("tool_calls") and "84" in calc["content"], calc
    assert "Paris" in capital["content"] and capital["reasoning_content"].strip() != capital["content"].strip()
    assert compare["content"].startswith("9.9 is bigger"), compare


def test_pictures(chat):
    """Image parts (PNG data URLs) through the demo's image encoder: a solid colour and a shape."""
    from PIL import Image, ImageDraw

    from k2ray.demo.pictures import data_url

    circle = Image.new("RGB", (96, 96), (240, 240, 240))
    ImageDraw.Draw(circle).ellipse((16, 16, 80, 80), fill=(215, 35, 35))
    blue = Image.new("RGB", (64, 48), (40, 75, 215))
    square = Image.new("RGB", (120, 80), (250, 250, 250))
    ImageDraw.Draw(square).rectangle((30, 10, 90, 70), fill=(40, 165, 60))
    def ask(img, text):
        return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(img)}},
                                             {"type": "text", "text": text}]}]

    outs = chat([ask(circle, "What shape is in the picture?"), ask(blue, "What colour is this?"),
                 ask(square, "What shape is this?")])
    words = [set(m["content"].lower().replace(".", " ").split()) for m, _ in outs]
    assert {"red", "circle"} <= words[0], outs[0]
    assert "blue" in words[1], outs[1]
    assert {"green", "square"} <= words[2], outs[2]


def test_llm_chat_and_cli_chat(demo, train_demo, capsys):
    """``LLM.chat`` (by built-in name) and ``k2ray generate --chat`` give the assistant turn that rendering with the
    chat template, generating and parsing by hand gives."""
    from k2ray import LLM, SamplingParams
    from k2ray.cli import main
    from k2ray.tokenizer.parsers import parse_output

    weather = [{"role": "user", "content": "What's the weather in Paris?"}]
    want = parse_output(demo([weather])[0]).to_message()
    assert want["tool_calls"][0]["function"]["name"] == "get_weather"
    with LLM("k2ray-demo") as llm:
        (res,) = llm.chat(weather, SamplingParams(temperature=0, max_tokens=80), tools=train_demo.TOOLS)
    assert res.messages == [want] and res.finish_reasons == ["tool_calls"]

    argv = ["generate", "--model", "k2ray-demo", "--chat", "--prompt", weather[0]["content"], "--max-tokens", "80",
            "--tools", json.dumps(train_demo.TOOLS)]
    assert main(argv) == 0
    call = want["tool_calls"][0]
    cap = capsys.readouterr()
    assert cap.out.splitlines() == [
        f"[reasoning] {want['reasoning_content']}",
        f"[tool call {call['id']}] get_weather {call['function']['arguments']}",
    ]
    assert cap.err == f"[finish_reason: tool_calls, {len(res.output.outputs[0].token_ids)} tokens]\n"
    assert main(argv[:-2] + ["--tools", "{not json"]) == 1
    assert "k2ray: error: --tools: not valid JSON" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------- executors
@pytest.mark.ray
def test_ray_executor_gives_the_local_tokens(train_demo):
    """fp32 greedy: the Ray executor (1 attention worker + 2 expert shards over gloo) writes exactly the tokens of the
    local executor, for a first turn (tool call), a turn after a tool result and a direct answer."""
    import ray

    from k2ray import LLM, SamplingParams
    from k2ray.tokenizer import ChatTemplate

    ct = ChatTemplate.from_dir(DEMO)
    call = {"id": "functions.get_weather:0", "type": "function",
            "function": {"name": "get_weather", "arguments": json.dumps({"city": "Paris"})}}
    conversations = [
        [{"role": "user", "content": "What's the weather in Paris?"}],
        [{"role": "user", "content": "What's the weather in Paris?"},
         {"role": "assistant", "content": "", "reasoning_content": "I will call get_weather.", "tool_calls": [call]},
         {"role": "tool", "tool_call_id": call["id"],
          "content": json.dumps({"city": "Paris", "temperature_c": 21, "condition": "sunny"})}],
        [{"role": "user", "content": "What is the capital of Japan?"}],
        [{"role": "user", "content": "Calculate 58 - 19."}],
    ]
    prompts = [ct.encode(m, tools=train_demo.TOOLS, add_generation_prompt=True) for m in conversations]
    params = SamplingParams(temperature=0.0, max_tokens=64, skip_special_tokens=False)

    local = LLM(model=str(DEMO))
    try:
        want = [o.outputs[0].token_ids for o in local.generate(prompts, params)]
    finally:
        local.shutdown()
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        dist = LLM(model=str(DEMO), executor="ray", attention_workers=1, expert_shards=2)
        try:
            got = [o.outputs[0].token_ids for o in dist.generate(prompts, params)]
        finally:
            dist.shutdown()
    finally:
        ray.shutdown()
    assert got == want
    assert all(len(t) > 8 for t in want)
