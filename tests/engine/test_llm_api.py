"""The public offline API (`from k2ray import LLM, SamplingParams`) and the `k2ray` CLI."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from k2ray import LLM, SamplingParams
from k2ray.cli import main


@pytest.fixture(scope="module")
def llm(model_dir):
    from .engine_helpers import one_torch_thread

    with one_torch_thread():
        m = LLM(model=str(model_dir), dtype="float32", num_kv_blocks=256, block_size=8)
    yield m
    m.shutdown()


def test_generate_strings_and_token_ids(llm):
    ids = llm.tokenizer.encode("hello")
    res = llm.generate(["hello", ids, [5, 6, 7]], SamplingParams(max_tokens=6, temperature=0.0, logprobs=2))
    assert len(res) == 3
    a, b, c = res
    assert a.prompt == "hello" and a.prompt_token_ids == ids and b.prompt is None
    assert a.outputs[0].token_ids == b.outputs[0].token_ids  # the same prompt either way
    for r in res:
        out = r.outputs[0]
        assert r.finished and out.finish_reason in ("stop", "length")
        assert 1 <= len(out.token_ids) <= 6 and len(out.logprobs) == len(out.token_ids)
        for tok, d in zip(out.token_ids, out.logprobs):
            assert tok in d and max(d, key=d.get) == tok  # greedy: the chosen token is the most likely
        assert out.text == llm.tokenizer.decode(
            [t for t in out.token_ids if t not in llm.engine.eos_token_ids], skip_special_tokens=True)
    # one prompt as a flat token list; per-prompt params
    (single,) = llm.generate([5, 6, 7], SamplingParams(max_tokens=6, temperature=0.0))
    assert single.outputs[0].token_ids == c.outputs[0].token_ids
    res = llm.generate(["a", "b"], [SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True),
                                    SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)])
    assert [len(r.outputs[0].token_ids) for r in res] == [2, 3]


def test_generate_validates_everything_first(llm):
    with pytest.raises(ValueError, match="prompt 1: .*max_model_len"):
        llm.generate(["ok", [7] * 5000], SamplingParams(max_tokens=2))
    assert not llm.engine.has_unfinished_requests()
    with pytest.raises(ValueError, match="params"):
        llm.generate(["a", "b"], [SamplingParams()])
    with pytest.raises(ValueError, match="temperature"):
        llm.generate("a", SamplingParams(temperature=-1))
    res = llm.generate("ok", SamplingParams(max_tokens=2, temperature=0.0))
    assert res[0].finished


def test_bfloat16(model_dir):
    from .engine_helpers import one_torch_thread

    with one_torch_thread(), LLM(model=model_dir, dtype="bfloat16", num_kv_blocks=64) as m:
        (r,) = m.generate("hello", SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    assert len(r.outputs[0].token_ids) == 4


def test_import_is_light():
    code = ("import sys, k2ray; from k2ray import cli; "
            "bad = [m for m in ('ray', 'transformers', 'torch') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cli_generate_and_errors(model_dir, capsys):
    from .engine_helpers import one_torch_thread

    with one_torch_thread():
        assert main(["generate", "--model", str(model_dir), "--prompt", "hello", "--max-tokens", "5"]) == 0
    cap = capsys.readouterr()
    out = cap.out
    assert out.startswith("hello") and len(out.strip()) > len("hello")
    # the finish reason goes to stderr (visible truncation; stdout stays the text alone)
    assert re.fullmatch(r"\[finish_reason: (length, 5 tokens \(raise --max-tokens for more\)|stop, [1-5] tokens)\]\n",
                        cap.err), cap.err
    assert main(["generate", "--model", str(model_dir) + "-missing", "--prompt", "x"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("k2ray: error:") and "Traceback" not in err
    assert main(["generate", "--model", str(model_dir), "--prompt", "x", "--temperature", "9"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "temperature" in err


def test_cli_make_tiny(tmp_path, capsys):
    d = tmp_path / "tiny"
    assert main(["make-tiny", str(d), "--seed", "3"]) == 0
    assert (d / "config.json").is_file() and (d / "tiktoken.model").is_file()
    assert "wrote" in capsys.readouterr().out
