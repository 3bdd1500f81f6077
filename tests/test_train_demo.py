"""``k2ray.demo``: the corpus, the training forward and the export that produce ``k2ray-demo``.

The shipped checkpoint's behaviour is tested in test_demo_model.py; here the trainer's parts are checked against
independent truths (the chat template, ``forward_full``, the INT4 checkpoint format) and a short run end to end.
"""

from __future__ import annotations

import json

import pytest
import torch


@pytest.fixture(scope="module")
def td(train_demo):
    return train_demo


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    from k2ray.tokenizer import ChatTemplate, write_tokenizer_files
    from k2ray.tokenizer.tiny import write_k25_files

    d = tmp_path_factory.mktemp("tok")
    write_tokenizer_files(d)
    write_k25_files(d)  # the demo's chat template: image parts become media markers
    return ChatTemplate.from_dir(d)


def _question(d) -> str:
    content = next(m for m in d.messages if m["role"] == "user")["content"]
    return content if isinstance(content, str) else " ".join(p["text"] for p in content if p["type"] == "text")


def test_corpus_is_deterministic_and_held_out_is_new(td):
    from k2ray.demo import corpus

    a, b = td.make_train_dialogs(600, seed=3), td.make_train_dialogs(600, seed=3)
    assert [d.messages for d in a] == [d.messages for d in b]
    assert [d.messages for d in td.make_train_dialogs(600, seed=4)] != [d.messages for d in a]
    assert {d.kind for d in a} == {k for k, _ in td.KIND_WEIGHTS}
    exprs = {d.check["expr"] for d in a if d.kind == "calculator"}
    held = td.make_heldout_dialogs(3, exprs)
    train_questions = {_question(d) for d in a}
    train_results = [m["content"] for d in a for m in d.messages if m["role"] == "tool"]
    for d in held:
        assert _question(d) not in train_questions  # held-out phrasings only
        if d.kind == "calculator":
            assert d.check["expr"] not in exprs
            assert eval(d.check["args"]["expression"]) == d.check["result"]
        if d.kind.startswith("weather"):
            assert d.check["result"] not in train_results
    # the held-out get_weather results use key names and error messages that no training get_weather result contains
    weather_results = [m["content"] for d in a for m in d.messages
                       if m["role"] == "tool" and m["tool_call_id"].startswith("functions.get_weather:")]
    assert len(weather_results) > 100
    for word in corpus.HELDOUT_COND_KEYS + corpus.HELDOUT_TEMP_KEYS + corpus.HELDOUT_OUTER_KEYS + corpus.HELDOUT_ERRORS:
        assert not any(f'"{word}"' in r for r in weather_results), word
    # every tool call of the corpus is well-formed K2: id functions.NAME:IDX, JSON arguments matching the tool schema
    for d in a:
        for m in d.messages:
            for tc in m.get("tool_calls") or ():
                name = tc["function"]["name"]
                assert tc["id"].startswith(f"functions.{name}:")
                args = json.loads(tc["function"]["arguments"])
                tool = next(t for t in d.tools if t["function"]["name"] == name)  # declared in this dialog
                assert set(args) == set(tool["function"]["parameters"]["required"])
        # arithmetic is answered by the calculator only where one is declared
        declared = {t["function"]["name"] for t in d.tools or ()}
        last_user = max(i for i, m in enumerate(d.messages) if m["role"] == "user")
        if d.kind == "arithmetic" and "calculator" not in declared:
            assert not any(m.get("tool_calls") for m in d.messages[last_user:])


def test_direct_arithmetic_and_comparisons_are_right(td):
    for d in td.make_train_dialogs(800, seed=5):
        last = d.messages[-1]["content"]
        if d.kind == "arithmetic" and "result" in d.check:
            a, sym, b = last.split(" = ")[0].split()
            assert eval(f"{a} {sym} {b}") == d.check["result"] and last.endswith(f"= {d.check['result']}.")
        if d.kind == "compare":
            big, small = last.removesuffix(".").split(" is bigger than ")
            assert float(big) > float(small), last
            assert d.messages[-1]["reasoning_content"] != last  # the reasoning plans, it does not repeat


def test_pictures_show_what_the_answer_says(td):
    """The drawn picture has the colour the answer names (the mean of its pixels of that hue) and, for shapes, the
    fill fraction of the shape: a square fills its box, a circle pi/4 of it, a triangle half."""
    import numpy as np

    from k2ray.demo.pictures import COLOURS

    seen = 0
    for d in td.make_train_dialogs(300, seed=6):
        if d.kind not in ("colour", "shape"):
            continue
        (img,) = d.images
        px = np.asarray(img, dtype=np.float32).reshape(-1, 3)
        centre = np.array(COLOURS[d.check["colour"]], dtype=np.float32)
        near = np.abs(px - centre).max(1) <= 20
        assert near.any()
        nearest = {name: np.abs(px[near].mean(0) - np.array(c)).sum() for name, c in COLOURS.items()}
        assert min(nearest, key=nearest.get) == d.check["colour"]
        if d.check["shape"]:
            ys, xs = np.nonzero(near.reshape(img.size[1], img.size[0]))
            box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
            fill = near.sum() / box
            want = {"square": 1.0, "circle": np.pi / 4, "triangle": 0.5}[d.check["shape"]]
            assert abs(fill - want) < 0.08, (d.check, fill)
        seen += 1
    assert seen > 50


def test_training_sequence_is_the_chat_template_rendering(td, chat):
    """The learned sequence is exactly what the serving stack renders and then generates: the prompt of the last
    turn with the generation prompt, then the assistant's ``<think>…</think>`` text (and tool calls) and ``<|im_end|>``;
    the loss mask covers exactly the assistant's own tokens."""
    from k2ray.tokenizer.parsers import parse_output

    dialogs = td.make_train_dialogs(200, seed=0)
    d = next(x for x in dialogs if x.kind == "weather" and x.tools is td.TOOLS and len(x.messages) == 4
             and isinstance(x.messages[0]["content"], str))
    ids, mask, images = td.encode_dialog(chat, d)
    assert images == []
    prompt = chat.encode(d.messages[:-1], tools=d.tools, add_generation_prompt=True)
    assert ids[: len(prompt)] == prompt
    tok = chat.tokenizer
    final = tok.decode(ids[len(prompt):])
    assert final.endswith("<|im_end|>")
    parsed = parse_output(final[: -len("<|im_end|>")])
    assert parsed.content == d.messages[-1]["content"]
    assert parsed.reasoning_content == d.messages[-1]["reasoning_content"]
    assert all(mask[len(prompt):])
    # the tool-call turn (after the last user message) is learned too, the user and tool turns are not
    learned = tok.decode([t for t, m in zip(ids[: len(prompt)], mask[: len(prompt)]) if m])
    assert '{"city": "' + d.check["args"]["city"] + '"}' in learned
    assert _question(d) not in learned and d.messages[2]["content"] not in learned


def test_packed_training_forward_equals_forward_full(td, chat):
    from k2ray.checkpoint.tiny import tiny_config
    from k2ray.config import ModelArgs

    model = td.init_model(ModelArgs.from_dict(tiny_config()), seed=0)
    user = chat.tokenizer.special_tokens["<|im_user|>"]
    data = [td.split_example(*td.encode_dialog(chat, d), user) for d in td.make_train_dialogs(12, seed=1)
            if not d.images][:5]
    assert td.check_packed(model, data) < 1e-4


def test_picture_sequence_and_packed_forward_equal_the_engine_path(td, tmp_path):
    """A picture's ``<|media_pad|>`` is expanded to its token count (unlearned), and the packed training forward with
    pictures equals the model's own forward with the image embeddings put in place (``embed_override``, the
    engine's path) for the same image encoder."""
    from k2ray.checkpoint.tiny import tiny_k25_config
    from k2ray.config import ModelArgs
    from k2ray.model.attention_metadata import AttentionMetadata
    from k2ray.tokenizer import ChatTemplate, write_tokenizer_files
    from k2ray.tokenizer.image import ImageProcessorConfig
    from k2ray.tokenizer.tiny import write_k25_files

    write_tokenizer_files(tmp_path)
    write_k25_files(tmp_path)
    chat = ChatTemplate.from_dir(tmp_path)
    cfg = ImageProcessorConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in td.DEMO_MEDIA_PROC_CFG.items()})
    pics = [d for d in td.make_train_dialogs(80, seed=7) if d.images][:3]
    user = chat.tokenizer.special_tokens["<|im_user|>"]
    pad = chat.tokenizer.special_tokens["<|media_pad|>"]
    data = []
    for d in pics:
        ids, mask, images = td.encode_dialog(chat, d, cfg)
        (im,) = images
        assert ids.count(pad) == im.num_tokens and 1 <= im.num_tokens <= 16
        assert not any(m for t, m in zip(ids, mask) if t == pad)
        data.append(td.split_example(ids, mask, images, user))
    args = ModelArgs.from_dict(tiny_k25_config())
    model = td.init_model(args, seed=0)
    assert args.media_placeholder_token_id == pad
    with torch.no_grad():
        td.set_train_experts(model, False)
        hidden, _ = td.forward_packed(model, data)
        packed = model.compute_logits(hidden)
        td.set_train_experts(model, None)
        rows = []
        for ex in data:
            seq = list(ex.prefix) + ex.suffix
            embeds = model.vision(ex.images[0].pixel_values, [ex.images[0].grid])[0]
            where = torch.tensor([i for i, t in enumerate(seq) if t == pad])
            h = model(torch.tensor(seq), torch.arange(len(seq)), AttentionMetadata.prefill_only([len(seq)]),
                      embed_override=(where, embeds))
            p = len(ex.prefix)
            rows.append(model.compute_logits(h)[[p + t for t in range(len(ex.suffix) - 1) if ex.mask[t + 1]]])
    assert (packed - torch.cat(rows)).abs().max() < 1e-4


def test_training_is_bit_reproducible_on_two_threads(td, chat):
    """What main() sets up (2 threads, deterministic algorithms): two runs give bit-identical weights."""
    from k2ray.checkpoint.tiny import tiny_config
    from k2ray.config import ModelArgs

    user = chat.tokenizer.special_tokens["<|im_user|>"]
    data = [td.split_example(*td.encode_dialog(chat, d), user) for d in td.make_train_dialogs(60, seed=2)
            if not d.images][:40]
    threads, det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)
    try:
        runs = []
        for _ in range(2):
            model = td.init_model(ModelArgs.from_dict(tiny_config()), seed=0)
            td.train(model, data, steps=3, batch_tokens=900, lr=6e-4, seed=0, qat_from=2, log=[])
            runs.append(model.state_dict())
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(det)
    assert runs[0].keys() == runs[1].keys()
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    fresh = td.init_model(ModelArgs.from_dict(tiny_config()), seed=0).state_dict()
    assert not torch.equal(fresh["lm_head.weight"], runs[0]["lm_head.weight"])  # it did train


def test_fake_quant_is_the_exported_int4(td):
    from k2ray.checkpoint.int4 import dequantize_int4, pack_int4, quantize_int4

    w = torch.randn(64, 128) * 0.05
    w.requires_grad_(True)
    fq = td.fake_quant_int4(w)
    q, scale = quantize_int4(w.detach(), 32, torch.bfloat16)
    assert torch.equal(fq.detach(), dequantize_int4(pack_int4(q), scale, w.shape))
    fq.sum().backward()  # straight-through: the gradient passes unchanged
    assert torch.equal(w.grad, torch.ones_like(w))


def test_short_run_writes_a_servable_k25_checkpoint(td, tmp_path):
    out = tmp_path / "demo"
    argv = ["--steps", "4", "--dialogs", "80", "--batch-tokens", "600", "--vision-steps", "3", "--out", str(out)]
    assert td.main(argv) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "kimi_k25" and config["quantization_config"]["format"] == "pack-quantized"
    assert json.loads((out / "preprocessor_config.json").read_text())["media_proc_cfg"] == td.DEMO_MEDIA_PROC_CFG
    card = (out / "README.md").read_text()
    assert "A toy" in card and "synthetic" in card and "tool calls well-formed" in card
    from k2ray import LLM, SamplingParams

    llm = LLM(model=str(out))
    try:
        (res,) = llm.generate([[2048, 5, 6, 7]], SamplingParams(temperature=0.0, max_tokens=4))
    finally:
        llm.shutdown()
    assert len(res.outputs[0].token_ids) == 4
