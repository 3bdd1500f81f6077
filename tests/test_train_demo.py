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

    d = tmp_path_factory.mktemp("tok")
    write_tokenizer_files(d)
    return ChatTemplate.from_dir(d)


def test_corpus_is_deterministic_and_held_out_is_new(td):
    a, b = td.make_train_dialogs(400, seed=3), td.make_train_dialogs(400, seed=3)
    assert [d.messages for d in a] == [d.messages for d in b]
    assert [d.messages for d in td.make_train_dialogs(400, seed=4)] != [d.messages for d in a]
    exprs = {d.check["expr"] for d in a if d.kind == "calculator"}
    held = td.make_heldout_dialogs(3, exprs)
    train_questions = {m["content"] for d in a for m in d.messages if m["role"] == "user"}
    for d in held:
        assert d.messages[0]["content"] not in train_questions  # held-out phrasings only
        if d.kind == "calculator":
            assert d.check["expr"] not in exprs
            assert eval(d.check["args"]["expression"]) == d.check["result"]
    # every tool call of the corpus is well-formed K2: id functions.NAME:IDX, JSON arguments matching the tool schema
    for d in a:
        for m in d.messages:
            for tc in m.get("tool_calls") or ():
                name = tc["function"]["name"]
                assert tc["id"].startswith(f"functions.{name}:")
                args = json.loads(tc["function"]["arguments"])
                tool = next(t for t in td.TOOLS if t["function"]["name"] == name)
                assert set(args) == set(tool["function"]["parameters"]["required"])


def test_training_sequence_is_the_chat_template_rendering(td, chat):
    """The learned sequence is exactly what the serving stack renders and then generates: the prompt of the last
    turn with the generation prompt, then the assistant's ``<think>…</think>`` text (and tool calls) and ``<|im_end|>``;
    the loss mask covers exactly the assistant's own tokens."""
    from k2ray.tokenizer.parsers import parse_output

    dialogs = td.make_train_dialogs(60, seed=0)
    d = next(x for x in dialogs if x.kind == "weather" and x.tools is td.TOOLS and len(x.messages) == 4)
    ids, mask = td.encode_dialog(chat, d)
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
    assert d.messages[0]["content"] not in learned and "temperature_c" not in learned


def test_packed_training_forward_equals_forward_full(td, chat):
    from k2ray.checkpoint.tiny import tiny_config
    from k2ray.config import ModelArgs

    model = td.init_model(ModelArgs.from_dict(tiny_config()), seed=0)
    user = chat.tokenizer.special_tokens["<|im_user|>"]
    data = [td.split_example(*td.encode_dialog(chat, d), user) for d in td.make_train_dialogs(5, seed=1)]
    assert td.check_packed(model, data) < 1e-4


def test_training_is_bit_reproducible_on_two_threads(td, chat):
    """What main() sets up (2 threads, deterministic algorithms): two runs give bit-identical weights."""
    from k2ray.checkpoint.tiny import tiny_config
    from k2ray.config import ModelArgs

    user = chat.tokenizer.special_tokens["<|im_user|>"]
    data = [td.split_example(*td.encode_dialog(chat, d), user) for d in td.make_train_dialogs(40, seed=2)]
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


def test_short_run_writes_a_servable_k2_checkpoint(td, tmp_path):
    out = tmp_path / "demo"
    assert td.main(["--steps", "4", "--dialogs", "80", "--batch-tokens", "600", "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["format"] == "pack-quantized"
    card = (out / "README.md").read_text()
    assert "A toy" in card and "synthetic" in card and "tool calls well-formed" in card
    from k2ray import LLM, SamplingParams

    llm = LLM(model=str(out))
    try:
        (res,) = llm.generate([[2048, 5, 6, 7]], SamplingParams(temperature=0.0, max_tokens=4))
    finally:
        llm.shutdown()
    assert len(res.outputs[0].token_ids) == 4
