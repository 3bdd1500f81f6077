"""LLMEngine on the tiny model: batch invariance (both executors), prefix caching, cache pressure, sampling features
checked against direct model computations."""

from __future__ import annotations

import importlib
import random

import pytest
import torch

from k2ray.config import EngineConfig, ParallelConfig
from k2ray.engine.engine import LLMEngine
from k2ray.engine.request import PromptTooLongError
from k2ray.runtime.sampling import SamplingParams

from .engine_helpers import run_to_completion

GREEDY = SamplingParams(temperature=0.0, max_tokens=8)


def _requests(n: int, seed: int, vocab: int = 2048, max_prompt: int = 40, max_out: int = 16):
    rng = random.Random(seed)
    reqs = []
    for i in range(n):
        prompt = [rng.randrange(1, vocab) for _ in range(rng.randrange(2, max_prompt))]
        reqs.append((f"r{i}", prompt, SamplingParams(temperature=0.0, max_tokens=rng.randrange(2, max_out))))
    return reqs


def _alone(engine: LLMEngine, reqs) -> dict[str, list[int]]:
    out = {}
    for rid, prompt, params in reqs:
        engine.add_request(prompt, params, request_id=rid)
        out[rid] = run_to_completion(engine)[rid].outputs[0].token_ids
    return out


BATCH = _requests(32, seed=0)
ABORTED = {"r5", "r17", "r26"}


@pytest.fixture(scope="module")
def alone_tokens(local_executor, model_dir):
    from .engine_helpers import ExecutorView, one_torch_thread

    engine = LLMEngine(ExecutorView(local_executor), EngineConfig(block_size=4, num_kv_blocks=1024))
    with one_torch_thread():
        return _alone(engine, BATCH)


def _ray_available() -> bool:
    try:
        importlib.import_module("k2ray.executor.ray")
        return True
    except ImportError:
        return False


@pytest.fixture
def executor_for(local_executor, model_dir):
    made = []
    started_ray = []

    def build(kind: str):
        if kind == "local":
            from .engine_helpers import ExecutorView

            return ExecutorView(local_executor)
        import ray

        from k2ray.executor.ray import RayExecutor

        if not ray.is_initialized():
            ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
            started_ray.append(ray)
        ex = RayExecutor(model_dir, EngineConfig(block_size=4, num_kv_blocks=256),
                         ParallelConfig(executor="ray", attention_workers=2, expert_shards=2))
        made.append(ex)
        return ex

    yield build
    for ex in made:
        ex.shutdown()
    for ray in started_ray:  # leave no cluster behind for later test modules
        ray.shutdown()


@pytest.mark.parametrize("kind", [
    "local",
    pytest.param("ray", marks=[pytest.mark.ray, pytest.mark.skipif(not _ray_available(),
                                                                    reason="k2ray.executor.ray not importable yet")]),
])
def test_batch_invariance_greedy_fp32(kind, executor_for, alone_tokens):
    """32 mixed requests arriving over time, with chunked prefill, queueing and aborts: every completed request's
    tokens equal its tokens when run alone (local executor)."""
    ex = executor_for(kind)
    engine = LLMEngine(ex, EngineConfig(block_size=4, num_kv_blocks=ex.num_kv_blocks, max_num_seqs=12,
                                        max_num_batched_tokens=48))
    pending = list(BATCH)
    final, partial = {}, {}
    step = 0
    while pending or engine.has_unfinished_requests():
        for _ in range(3 if step % 2 == 0 else 1):  # arrivals spread over the steps
            if pending:
                rid, prompt, params = pending.pop(0)
                engine.add_request(prompt, params, request_id=rid)
        for out in engine.step():
            partial[out.request_id] = out.outputs[0].token_ids
            if out.finished:
                final[out.request_id] = out
        for rid in ABORTED:
            if len(partial.get(rid, ())) >= 2 and rid not in final:
                final[rid] = engine.abort_request(rid)
        step += 1
        if kind == "local":
            assert len(ex.inner.runner.kv_caches) == engine.args.num_hidden_layers  # the shared model is used
    assert set(final) == {rid for rid, _, _ in BATCH}
    for rid, _, params in BATCH:
        out = final[rid].outputs[0]
        if rid in ABORTED:
            assert out.finish_reason == "abort"
            assert out.token_ids == alone_tokens[rid][: len(out.token_ids)]
        else:
            assert out.token_ids == alone_tokens[rid], rid
    for bm in engine.scheduler.managers:
        assert bm.num_free_blocks == bm.num_blocks
    if kind == "ray":
        assert len(engine.scheduler.managers) == 2
        assert all(bm.prefix_queries for bm in engine.scheduler.managers)  # both attention workers were used


def test_prefix_cache_computes_only_new_tokens(make_engine):
    engine = make_engine()
    bs = engine.block_size
    rng = random.Random(3)
    shared = [rng.randrange(1, 2048) for _ in range(3 * bs)]
    a = shared + [11, 12, 13]
    b = shared + [21, 22, 23, 24, 25]
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    engine.add_request(a, params)
    run_to_completion(engine)
    before = engine.num_computed_tokens
    rid = engine.add_request(b, params)
    out = run_to_completion(engine)[rid]
    computed = engine.num_computed_tokens - before
    assert computed == 5 + (6 - 1)  # the 5 new prompt tokens, then one per further generated token
    assert out.num_cached_tokens == 3 * bs
    assert engine.prefix_cache_hit_tokens == 3 * bs
    cold = make_engine(enable_prefix_caching=False)
    rid = cold.add_request(b, params)
    assert run_to_completion(cold)[rid].outputs[0].token_ids == out.outputs[0].token_ids


def test_cache_pressure_64_requests(make_engine, local_executor):
    reqs = _requests(64, seed=1, max_prompt=24, max_out=12)
    engine = make_engine(num_kv_blocks=40, max_num_seqs=64, max_num_batched_tokens=96)
    for rid, prompt, params in reqs:
        engine.add_request(prompt, params, request_id=rid)
    usage = []
    final = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out
        usage.append(engine.kv_cache_usage())
    assert engine.num_preemptions > 0 and max(usage) > 0.8
    ref = _alone(make_engine(), reqs)
    for rid, _, params in reqs:
        assert final[rid].outputs[0].token_ids == ref[rid], rid
    bm = engine.scheduler.managers[0]
    bm.check_consistent()
    assert bm.num_free_blocks == bm.num_blocks and engine.kv_cache_usage() == 0.0


def test_too_long_prompt_fails_alone(make_engine):
    engine = make_engine(num_kv_blocks=16)  # 64 tokens
    ok = engine.add_request([5, 6, 7], GREEDY)
    engine.step()
    with pytest.raises(PromptTooLongError, match="max_model_len=64"):
        engine.add_request(list(range(1, 80)), GREEDY)
    out = run_to_completion(engine)[ok].outputs[0]
    alone = make_engine()
    rid = alone.add_request([5, 6, 7], GREEDY)
    assert run_to_completion(alone)[rid].outputs[0].token_ids == out.token_ids


# -- sampling features against the model computed directly ----------------------------------------------------------
def _full_logits(local_executor, ids):
    model = local_executor.runner.model
    with torch.inference_mode():
        return model.forward_full([list(ids)]).float()


def test_logprobs_and_prompt_logprobs_match_full_recomputation(make_engine, local_executor):
    engine = make_engine()
    prompt = [17, 400, 1203, 9, 77, 5, 600, 31, 2000, 44]
    rid = engine.add_request(prompt, SamplingParams(temperature=0.0, max_tokens=5, logprobs=3, prompt_logprobs=2))
    out = run_to_completion(engine)[rid]
    toks = out.outputs[0].token_ids
    lp = torch.log_softmax(_full_logits(local_executor, prompt + toks), -1)
    n = len(prompt)
    for j, (tok, d) in enumerate(zip(toks, out.outputs[0].logprobs)):
        row = lp[n - 1 + j]
        assert tok == int(row.argmax())
        assert tok in d and 3 <= len(d) <= 4
        top = torch.topk(row, 3)
        for t, v in zip(top.indices.tolist(), top.values.tolist()):
            assert d[t] == pytest.approx(v, abs=1e-4)
        assert d[tok] == pytest.approx(float(row[tok]), abs=1e-4)
    assert out.outputs[0].cumulative_logprob == pytest.approx(sum(d[t] for t, d in zip(toks, out.outputs[0].logprobs)))
    plp = out.prompt_logprobs
    assert len(plp) == n and plp[0] is None
    for i in range(1, n):
        assert plp[i][prompt[i]] == pytest.approx(float(lp[i - 1, prompt[i]]), abs=1e-4)
        assert len(plp[i]) in (2, 3)


def test_prompt_logprobs_with_chunked_prefill(make_engine):
    prompt = list(range(100, 130))
    params = SamplingParams(temperature=0.0, max_tokens=2, prompt_logprobs=0)
    a = make_engine(max_num_batched_tokens=7)
    rid = a.add_request(prompt, params)
    chunked = run_to_completion(a)[rid].prompt_logprobs
    b = make_engine()
    rid = b.add_request(prompt, params)
    whole = run_to_completion(b)[rid].prompt_logprobs
    assert len(chunked) == len(whole) == 30
    for x, y in zip(chunked[1:], whole[1:]):
        assert list(x) == list(y) and list(x.values()) == pytest.approx(list(y.values()), abs=1e-4)


def test_penalties_match_a_hand_loop_on_the_model(make_engine, local_executor):
    prompt = [5, 5, 9, 300, 5, 12]
    # negative presence/frequency penalties reward repeats: the output must change
    params = SamplingParams(temperature=0.0, max_tokens=8, repetition_penalty=1.3, frequency_penalty=-0.7,
                            presence_penalty=-0.4, ignore_eos=True)
    engine = make_engine()
    rid = engine.add_request(prompt, params)
    got = run_to_completion(engine)[rid].outputs[0].token_ids
    ctx, out = list(prompt), []
    for _ in range(8):
        row = _full_logits(local_executor, ctx)[-1].clone()
        for t in set(ctx):
            row[t] = row[t] / 1.3 if row[t] > 0 else row[t] * 1.3
        for t in set(out):
            row[t] -= -0.7 * out.count(t) - 0.4
        nxt = int(row.argmax())
        out.append(nxt)
        ctx.append(nxt)
    assert got == out
    engine2 = make_engine()
    rid = engine2.add_request(prompt, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
    assert run_to_completion(engine2)[rid].outputs[0].token_ids != got  # the penalties did something


def test_stop_strings(make_engine):
    engine = make_engine()
    tok = engine.tokenizer
    prompt = tok.encode("hello world")
    rid = engine.add_request(prompt, SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True))
    base = run_to_completion(engine)[rid].outputs[0]
    text = base.text
    assert len(text) > 12
    stop = text[5:8]
    cut = text.index(stop)
    rid = engine.add_request(prompt, SamplingParams(temperature=0.0, max_tokens=24, stop=[stop, "\x00never"],
                                                    ignore_eos=True))
    out = run_to_completion(engine)[rid].outputs[0]
    assert out.text == text[:cut] and out.finish_reason == "stop" and out.stop_reason == stop
    assert base.token_ids[: len(out.token_ids)] == out.token_ids
    assert tok.decode(out.token_ids).startswith(text[:cut] + stop)
    rid = engine.add_request(prompt, SamplingParams(temperature=0.0, max_tokens=24, stop=stop,
                                                    include_stop_str_in_output=True, ignore_eos=True))
    assert run_to_completion(engine)[rid].outputs[0].text == text[: cut + len(stop)]
    # before min_tokens a stop string does not count
    rid = engine.add_request(prompt, SamplingParams(temperature=0.0, max_tokens=24, stop=stop, min_tokens=20,
                                                    ignore_eos=True))
    late = run_to_completion(engine)[rid].outputs[0]
    assert late.text.startswith(text[: cut + len(stop)]) and len(late.token_ids) >= 20


def test_streamed_text_never_shows_a_stop_string(make_engine):
    engine = make_engine()
    prompt = engine.tokenizer.encode("stream me")
    rid = engine.add_request(prompt, SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True))
    text = run_to_completion(engine)[rid].outputs[0].text
    stop = text[6:10]
    rid = engine.add_request(prompt, SamplingParams(temperature=0.0, max_tokens=20, stop=[stop], ignore_eos=True))
    deltas = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            deltas.append(out.outputs[0].delta_text)
            assert stop not in out.outputs[0].text
    assert "".join(deltas) == text[: text.index(stop)]


def test_seeded_sampling_reproducible_across_batches(make_engine):
    prompt = [40, 41, 42, 43, 44]
    params = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=1234, max_tokens=10, ignore_eos=True)
    a = make_engine()
    rid = a.add_request(prompt, params)
    alone = run_to_completion(a)[rid].outputs[0].token_ids
    b = make_engine(max_num_batched_tokens=16)
    for rid2, p, _ in _requests(6, seed=5):
        b.add_request(p, SamplingParams(temperature=1.0, max_tokens=12), request_id=rid2)
    rid = b.add_request(prompt, params)
    for rid2, p, _ in _requests(4, seed=6):
        b.add_request(p, SamplingParams(temperature=0.7, seed=9, max_tokens=5), request_id="x" + rid2)
    batched = run_to_completion(b)[rid].outputs[0].token_ids
    assert batched == alone
    # n > 1: the first completion is the n=1 one, the others differ, all reproducible
    c = make_engine()
    rid = c.add_request(prompt, params.model_copy(update={"n": 3}))
    outs = run_to_completion(c)[rid].outputs
    assert outs[0].token_ids == alone
    assert len({tuple(o.token_ids) for o in outs}) == 3
    rid = c.add_request(prompt, params.model_copy(update={"n": 3}))
    assert [o.token_ids for o in run_to_completion(c)[rid].outputs] == [o.token_ids for o in outs]


def test_eos_is_default_stop_unless_ignored(make_engine):
    engine = make_engine()
    prompt = [8, 9, 10]
    rid = engine.add_request(prompt, SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True))
    ref = run_to_completion(engine)[rid].outputs[0].token_ids
    fake_eos = ref[1]
    engine = make_engine(eos_token_ids=[fake_eos])
    rid = engine.add_request(prompt, SamplingParams(temperature=0.0, max_tokens=6))
    out = run_to_completion(engine)[rid].outputs[0]
    assert out.token_ids == ref[: ref.index(fake_eos) + 1] and out.finish_reason == "stop"
    rid = engine.add_request(prompt, SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True))
    assert run_to_completion(engine)[rid].outputs[0].token_ids == ref
    rid = engine.add_request(prompt, SamplingParams(temperature=0.0, max_tokens=6, min_tokens=4))
    out = run_to_completion(engine)[rid].outputs[0]
    assert len(out.token_ids) >= 4 and fake_eos not in out.token_ids[:4]


def test_default_stop_ids_come_from_generation_config(model_dir):
    import json

    from k2ray.engine.input_processor import load_eos_token_ids

    gen = json.loads((model_dir / "generation_config.json").read_text())
    assert load_eos_token_ids(model_dir) == gen["eos_token_id"]
