"""Scheduling and paging, exactly, against a model-free executor (see ``FakeExecutor``)."""

from __future__ import annotations

import random

import pytest

from k2ray.config import EngineConfig
from k2ray.engine.engine import LLMEngine
from k2ray.engine.request import FinishReason, PromptTooLongError
from k2ray.engine.step_cost import StepBudget, chunk_cost, max_chunk
from k2ray.runtime.sampling import SamplingParams

from .engine_helpers import FakeExecutor, fake_reference


def _engine(**kw) -> tuple[LLMEngine, FakeExecutor]:
    ex_kw = {k: kw.pop(k) for k in ("num_attention_workers", "num_kv_blocks", "block_size") if k in kw}
    ex = FakeExecutor(**ex_kw)
    cfg = EngineConfig(block_size=ex.block_size, num_kv_blocks=ex.num_kv_blocks, **kw)
    return LLMEngine(ex, cfg), ex


def _run(engine: LLMEngine, max_steps: int = 100_000) -> dict[str, object]:
    final = {}
    for _ in range(max_steps):
        if not engine.has_unfinished_requests():
            return final
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out
    raise AssertionError("engine did not finish")


def _assert_no_leaks(engine: LLMEngine) -> None:
    for bm in engine.scheduler.managers:
        bm.check_consistent()
        assert bm.num_free_blocks == bm.num_blocks, "cache blocks leaked"
        assert bm.usage == 0.0
    assert engine.num_running == 0 and engine.num_waiting == 0


P = SamplingParams(max_tokens=6, temperature=0.0)


def test_token_budget_chunked_prefill_mixed_with_decode():
    engine, ex = _engine(max_num_batched_tokens=16, max_num_seqs=8, block_size=4, num_kv_blocks=64)
    engine.add_request(list(range(1, 6)), P, request_id="short")
    engine.step()  # prefill of "short" (5 tokens) + first token
    engine.add_request(list(range(10, 50)), P, request_id="long")  # 40 tokens: chunked
    engine.step()
    step = ex.steps[-1]
    # The decode of "short" comes first, then a 15-token chunk of "long": exactly the budget.
    assert [len(s.token_ids) for s in step.seqs] == [1, 15]
    assert step.seqs[0].sample is not None and step.seqs[1].sample is None
    engine.step()
    assert [len(s.token_ids) for s in ex.steps[-1].seqs] == [1, 15]
    engine.step()  # last 10 prompt tokens of "long" -> sample
    assert [len(s.token_ids) for s in ex.steps[-1].seqs] == [1, 10]
    assert ex.steps[-1].seqs[1].sample is not None
    final = _run(engine)
    assert final["long"].outputs[0].token_ids == fake_reference(list(range(10, 50)), 6)
    assert final["short"].outputs[0].token_ids == fake_reference(list(range(1, 6)), 6)
    for st in ex.steps:
        assert sum(len(s.token_ids) for s in st.seqs) <= 16
    _assert_no_leaks(engine)


def test_max_num_seqs_and_fcfs():
    engine, ex = _engine(max_num_batched_tokens=64, max_num_seqs=3, block_size=4, num_kv_blocks=64)
    for i in range(7):
        engine.add_request([i + 1] * 3, SamplingParams(max_tokens=2 + i % 3, temperature=0.0), request_id=f"r{i}")
    order = []
    while engine.has_unfinished_requests():
        outs = engine.step()
        assert engine.num_running <= 3
        assert len(ex.steps[-1].seqs) <= 3
        order += [o.request_id for o in outs if o.finished]
    # Admission is FCFS: a request is first scheduled no later than any request that arrived after it.
    first_step = {}
    for k, st in enumerate(ex.steps):
        for s in st.seqs:
            first_step.setdefault(s.seq_id, k)
    firsts = [first_step[i] for i in sorted(first_step)]
    assert firsts == sorted(firsts)
    _assert_no_leaks(engine)


def test_large_request_not_starved_by_small_ones():
    """A big prompt at the head of the queue is admitted before later small ones even if they would fit."""
    engine, ex = _engine(max_num_batched_tokens=8, max_num_seqs=4, block_size=4, num_kv_blocks=12)
    engine.add_request(list(range(1, 30)), SamplingParams(max_tokens=12, temperature=0.0), request_id="a")
    engine.step()
    engine.add_request(list(range(1, 30)), SamplingParams(max_tokens=2, temperature=0.0), request_id="big")
    for i in range(6):
        engine.add_request([7, 8], SamplingParams(max_tokens=2, temperature=0.0), request_id=f"small{i}")
    final = _run(engine)
    assert set(final) == {"a", "big"} | {f"small{i}" for i in range(6)}
    first = {}
    for k, st in enumerate(ex.steps):
        for s in st.seqs:
            first.setdefault(s.seq_id, k)
    big_seq = 1
    assert all(first[big_seq] <= first[s] for s in range(2, 8))
    _assert_no_leaks(engine)


def test_admission_control_and_preemption_by_recompute_no_leaks():
    """64 requests through a cache far too small for them together: all finish with the unbatched result."""
    engine, ex = _engine(max_num_batched_tokens=64, max_num_seqs=32, block_size=4, num_kv_blocks=40)
    rng = random.Random(0)
    expected = {}
    for i in range(64):
        prompt = [rng.randrange(1, 900) for _ in range(rng.randrange(3, 40))]
        mt = rng.randrange(1, 30)
        rid = engine.add_request(prompt, SamplingParams(max_tokens=mt, temperature=0.0), request_id=f"q{i}")
        expected[rid] = fake_reference(prompt, mt)
    final = _run(engine)
    assert engine.num_preemptions > 0
    for rid, toks in expected.items():
        out = final[rid].outputs[0]
        assert out.token_ids == toks, rid
        assert out.finish_reason == "length"
    for st in ex.steps:
        assert sum(len(s.token_ids) for s in st.seqs) <= 64
    _assert_no_leaks(engine)


def test_preemption_keeps_prefix_cache_and_attention_ranks():
    """Two attention workers, each with its own blocks: sequences stay on their attention rank; no leaks anywhere."""
    engine, ex = _engine(num_attention_workers=2, max_num_batched_tokens=32, max_num_seqs=16, block_size=4,
                         num_kv_blocks=16)
    rng = random.Random(1)
    expected = {}
    for i in range(24):
        prompt = [rng.randrange(1, 900) for _ in range(rng.randrange(3, 20))]
        mt = rng.randrange(1, 20)
        expected[engine.add_request(prompt, SamplingParams(max_tokens=mt, temperature=0.0))] = fake_reference(prompt, mt)
    rank_of = {}
    final = _run(engine)
    for st in ex.steps:
        for s in st.seqs:
            assert rank_of.setdefault(s.seq_id, s.attention_rank) == s.attention_rank
    assert set(rank_of.values()) == {0, 1}
    for rid, toks in expected.items():
        assert final[rid].outputs[0].token_ids == toks
    _assert_no_leaks(engine)


def test_prefix_cache_counts_computed_tokens():
    engine, ex = _engine(block_size=4, num_kv_blocks=64)
    shared = list(range(100, 112))  # 3 full blocks
    a = shared + [1, 2]
    b = shared + [5, 6, 7]
    final = _run_one(engine, a, 3)
    assert final.outputs[0].token_ids == fake_reference(a, 3)
    before = ex.computed_tokens
    out = _run_one(engine, b, 3)
    # Only the 3 new prompt tokens and 2 decode steps are computed.
    assert ex.computed_tokens - before == 3 + 2
    assert out.num_cached_tokens == 12
    assert out.outputs[0].token_ids == fake_reference(b, 3)
    assert engine.prefix_cache_hit_tokens == 12
    # A prompt that is entirely cached still computes its last token (the logits of the next one).
    before = ex.computed_tokens
    out = _run_one(engine, shared, 2)
    assert ex.computed_tokens - before == 4 + 1  # the last block is recomputed, not partially overwritten
    assert out.outputs[0].token_ids == fake_reference(shared, 2)
    _assert_no_leaks(engine)


def _run_one(engine, prompt, mt):
    rid = engine.add_request(prompt, SamplingParams(max_tokens=mt, temperature=0.0))
    return _run(engine)[rid]


def test_prefix_cache_lru_eviction():
    engine, ex = _engine(block_size=4, num_kv_blocks=8)
    p1 = list(range(1, 13))
    p2 = list(range(50, 62))
    _run_one(engine, p1, 1)
    _run_one(engine, p2, 1)  # both cached (unreferenced) now; 8 blocks hold 6 cached blocks
    bm = engine.scheduler.managers[0]
    assert bm.num_cached_blocks == 6
    _run_one(engine, list(range(200, 220)), 1)  # needs 5 blocks: evicts p1's blocks first (least recent)
    before = ex.computed_tokens
    _run_one(engine, p2 + [9], 1)
    assert ex.computed_tokens - before < 13  # p2 still (partly) cached
    before = ex.computed_tokens
    _run_one(engine, p1 + [9], 1)
    assert ex.computed_tokens - before == 13  # p1 was evicted
    _assert_no_leaks(engine)


def test_abort_frees_blocks_at_once():
    engine, ex = _engine(block_size=4, num_kv_blocks=32)
    rid = engine.add_request(list(range(1, 20)), SamplingParams(max_tokens=50, temperature=0.0))
    other = engine.add_request(list(range(1, 9)), SamplingParams(max_tokens=5, temperature=0.0))
    engine.step()
    engine.step()
    used = engine.scheduler.managers[0].num_used_blocks
    assert used >= 5 + 2
    out = engine.abort_request(rid)
    assert out.finished and out.outputs[0].finish_reason == "abort"
    # Only the other request's blocks remain held.
    assert engine.scheduler.managers[0].num_used_blocks == len(engine.get_request(other).seqs[0].block_table)
    assert engine.abort_request(rid) is None
    final = _run(engine)
    assert final[other].outputs[0].token_ids == fake_reference(list(range(1, 9)), 5)
    _assert_no_leaks(engine)


def test_prompt_too_long_only_fails_that_request():
    engine, _ = _engine(block_size=4, num_kv_blocks=8)  # 32 tokens of cache
    assert engine.max_model_len == 32
    ok = engine.add_request([1, 2, 3], SamplingParams(max_tokens=4, temperature=0.0))
    engine.step()
    with pytest.raises(PromptTooLongError, match="max_model_len=32"):
        engine.add_request(list(range(1, 40)), SamplingParams(max_tokens=4))
    final = _run(engine)
    assert final[ok].outputs[0].token_ids == fake_reference([1, 2, 3], 4)
    # Generation stops at the context limit with finish_reason "length".
    rid = engine.add_request(list(range(1, 30)), SamplingParams(max_tokens=100, temperature=0.0))
    out = _run(engine)[rid].outputs[0]
    assert len(out.token_ids) == 3 and out.finish_reason == "length"
    _assert_no_leaks(engine)


def test_max_model_len_larger_than_cache_is_rejected():
    ex = FakeExecutor(num_kv_blocks=8, block_size=4)
    with pytest.raises(ValueError, match="max_model_len"):
        LLMEngine(ex, EngineConfig(block_size=4, num_kv_blocks=8, max_model_len=100))


def test_stop_token_and_min_tokens_and_ignore_eos():
    engine, _ = _engine(block_size=4, num_kv_blocks=64)
    prompt = [3, 1, 4, 1, 5]
    ref = fake_reference(prompt, 10)
    stop_at = ref[2]
    out = _run_one_p(engine, prompt, SamplingParams(max_tokens=10, temperature=0.0, stop_token_ids=[stop_at]))
    k = ref.index(stop_at)
    assert out.token_ids == ref[: k + 1] and out.finish_reason == "stop" and out.stop_reason == stop_at
    # The same token acting as EOS: finish_reason "stop", stop_reason None; ignore_eos disables it.
    engine2 = LLMEngine(FakeExecutor(eos=(stop_at,)), EngineConfig(block_size=4, num_kv_blocks=64))
    out = _run_one_p(engine2, prompt, SamplingParams(max_tokens=10, temperature=0.0))
    assert out.token_ids == ref[: k + 1] and out.finish_reason == "stop" and out.stop_reason is None
    out = _run_one_p(engine2, prompt, SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True))
    assert out.token_ids == ref and out.finish_reason == "length"


def test_min_tokens_bans_stop_tokens():
    engine, ex = _engine(block_size=4, num_kv_blocks=64)
    engine.add_request([1, 2, 3], SamplingParams(max_tokens=5, min_tokens=2, temperature=0.0, stop_token_ids=[7]))
    banned = []
    while engine.has_unfinished_requests():
        engine.step()
        banned.append(sorted(ex.steps[-1].seqs[0].sample.banned_ids))
    assert banned[:2] == [[7, 999], [7, 999]] and all(b == [] for b in banned[2:])


def _run_one_p(engine, prompt, params):
    rid = engine.add_request(prompt, params)
    return _run(engine)[rid].outputs[0]


def test_n_completions_have_distinct_seeds():
    engine, ex = _engine(block_size=4, num_kv_blocks=64)
    rid = engine.add_request([1, 2, 3], SamplingParams(n=3, max_tokens=2, temperature=1.0, seed=11))
    engine.step()
    seeds = [s.sample.params.seed for s in ex.steps[0].seqs]
    assert seeds[0] == 11 and len(set(seeds)) == 3
    out = _run(engine)[rid]
    assert [o.index for o in out.outputs] == [0, 1, 2]
    _assert_no_leaks(engine)


def test_request_ids_and_validation():
    engine, _ = _engine()
    engine.add_request([1], P, request_id="x")
    with pytest.raises(ValueError, match="request_id"):
        engine.add_request([1], P, request_id="x")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.add_request([1, 5000], P)
    with pytest.raises(ValueError, match="empty prompt"):
        engine.add_request([], P)
    with pytest.raises(ValueError, match="tokenizer"):
        engine.add_request("text", P)
    with pytest.raises(ValueError, match="stop"):
        engine.add_request([1], SamplingParams(stop=["x"]))
    _run(engine)
    engine.add_request([1], P, request_id="x")  # finished ids can be reused


# -- long context (#21): the cost budget, decodes first, fair turns, progress ---------------------------------------
def _chunks(step) -> list[tuple[int, int, int]]:
    """(seq_id, start, tokens) of the prompt chunks in a step (a decode: one token, sampled)."""
    return [(s.seq_id, s.start_pos, len(s.token_ids)) for s in step.seqs
            if len(s.token_ids) > 1 or s.sample is None]


def test_chunk_cost_and_max_chunk():
    assert chunk_cost(100, 0, 8192) == 100  # short context: exactly the token count
    assert chunk_cost(1, 8192, 8192) == 2  # a decode at context A costs two tokens
    assert chunk_cost(64, 128, 64) == 64 + 64 * 320 // 128
    for a in (1, 7, 64, 1000):
        for c in (0, 3, 100, 5000):
            for left in (0, 1, 5, 77, 1000):
                for limit in (0, 1, 9, 300):
                    q = max_chunk(c, limit, left, a)
                    best = max((x for x in range(limit + 1) if chunk_cost(x, c, a) <= left), default=0)
                    assert q == best, (c, limit, left, a)


def test_long_context_chunks_are_sized_down_by_the_cost_budget():
    engine, ex = _engine(max_num_batched_tokens=256, attention_cost_tokens=64, block_size=4, num_kv_blocks=512)
    prompt = [(7 * i) % 900 + 1 for i in range(1000)]
    rid = engine.add_request(prompt, SamplingParams(max_tokens=3, temperature=0.0))
    final = _run(engine)
    prompt_steps = [st.seqs[0] for st in ex.steps if st.seqs[0].start_pos < 1000]
    sizes = [len(s.token_ids) for s in prompt_steps]
    starts = [s.start_pos for s in prompt_steps]
    # 128 + 128^2/128 = 256 at context 0; 72 + 72*(256+72)/128 = 256 at context 128; ...; one block at the end.
    assert sizes[:2] == [128, 72]
    assert sizes == sorted(sizes, reverse=True) and sum(sizes) == 1000
    for start, n in zip(starts, sizes):
        # as large as the budget allows, and never below one block (the last chunk: what is left)
        assert n == max(max_chunk(start, 1000 - start, 256, 64), min(4, 1000 - start))
    # Token-count budgeting alone would have needed 4 steps for the prompt.
    assert len(sizes) > 20
    assert final[rid].outputs[0].token_ids == fake_reference(prompt, 3)
    _assert_no_leaks(engine)


def test_decodes_always_scheduled_and_prompt_progresses_by_a_block():
    """Running decodes are never dropped for a chunk; when they alone exceed the cost budget the prompt still gets
    one block per step."""
    engine, ex = _engine(max_num_batched_tokens=64, max_step_cost=8, attention_cost_tokens=8, block_size=4,
                         num_kv_blocks=256)
    streams = {}
    for i in range(4):
        p = [i + 1] * 40
        streams[engine.add_request(p, SamplingParams(max_tokens=60, temperature=0.0), request_id=f"s{i}")] = p
    while any(len(s.token_ids) > 1 for s in (ex.steps[-1].seqs if ex.steps else [None]) if s) or not ex.steps:
        engine.step()  # until the four prompts are in (small budget: a block per step at the end)
    long_prompt = [(3 * i) % 900 + 1 for i in range(200)]
    engine.add_request(long_prompt, SamplingParams(max_tokens=2, temperature=0.0), request_id="long")
    long_seq = engine.get_request("long").seqs[0]
    while long_seq.num_computed < 200 and long_seq.finish_reason is None:
        engine.step()
        st = ex.steps[-1]
        decodes = [s.seq_id for s in st.seqs if len(s.token_ids) == 1 and s.sample is not None]
        assert len(decodes) == 4  # all four streams, every step
        chunks = _chunks(st)
        # the decodes alone cost 4 x (1 + ~45/8) > 8: the prompt gets exactly one block (its first may be cached)
        assert [c[2] for c in chunks] == [4]
        assert engine.last_step_stats.cost > engine.last_step_stats.cost_budget == 8
    final = _run(engine)
    assert final["long"].outputs[0].token_ids == fake_reference(long_prompt, 2)
    for rid, p in streams.items():
        assert final[rid].outputs[0].token_ids == fake_reference(p, 60)
    _assert_no_leaks(engine)


def test_two_long_prompts_take_turns():
    """The older long prompt does not take every step until it is done: the two lead alternately."""
    engine, ex = _engine(max_num_batched_tokens=16, block_size=4, num_kv_blocks=128)
    a = [5] * 160
    b = [6] * 160
    engine.add_request(a, SamplingParams(max_tokens=2, temperature=0.0), request_id="a")
    engine.add_request(b, SamplingParams(max_tokens=2, temperature=0.0), request_id="b")
    leaders = []
    while len(leaders) < 16:
        engine.step()
        chunks = _chunks(ex.steps[-1])
        assert len(chunks) == 1 and chunks[0][2] == 16  # one chunk fills the step's tokens
        leaders.append(chunks[0][0])
    assert leaders == [0, 1] * 8  # seq ids: a = 0, b = 1
    final = _run(engine)
    assert final["a"].outputs[0].token_ids == fake_reference(a, 2)
    assert final["b"].outputs[0].token_ids == fake_reference(b, 2)
    _assert_no_leaks(engine)


def test_new_request_admitted_while_a_long_prompt_prefills():
    engine, ex = _engine(max_num_batched_tokens=16, block_size=4, num_kv_blocks=256)
    engine.add_request([5] * 400, SamplingParams(max_tokens=2, temperature=0.0), request_id="long")
    engine.step()
    engine.step()
    engine.add_request([1, 2, 3], SamplingParams(max_tokens=2, temperature=0.0), request_id="short")
    for _ in range(3):
        outs = engine.step()
        if any(o.request_id == "short" for o in outs):
            break
    else:
        raise AssertionError("the short request waited for the long prompt")
    _run(engine)
    _assert_no_leaks(engine)


def test_every_step_within_both_budgets():
    """A random mixed workload at long context: each step stays within the token budget, and within the cost budget
    unless what exceeds it is only decodes plus one chunk of at most one block. Outputs stay exact."""
    budget, bs, a = 48, 4, 16
    engine, ex = _engine(max_num_batched_tokens=budget, attention_cost_tokens=a, block_size=bs, num_kv_blocks=160,
                         max_num_seqs=8)
    rng = random.Random(3)
    expected = {}
    for i in range(16):
        prompt = [rng.randrange(1, 900) for _ in range(rng.choice([5, 30, 120, 200]))]
        mt = rng.randrange(1, 25)
        expected[engine.add_request(prompt, SamplingParams(max_tokens=mt, temperature=0.0))] = fake_reference(prompt, mt)
    final = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out
        st, stats = ex.steps[-1], engine.last_step_stats
        assert sum(len(s.token_ids) for s in st.seqs) <= budget
        costs = [chunk_cost(len(s.token_ids), s.start_pos, a) for s in st.seqs]
        assert stats.cost == sum(costs) and stats.cost_budget == budget
        chunks = _chunks(st)
        if stats.cost > budget:
            assert len(chunks) <= 1 and all(c[2] <= bs for c in chunks), (stats, chunks)
    for rid, toks in expected.items():
        assert final[rid].outputs[0].token_ids == toks
    _assert_no_leaks(engine)


def test_step_budget_calibrates_to_max_step_ms():
    b = StepBudget(1000, max_step_ms=100.0)
    assert b.value == 1000 and b.ms_per_cost is None
    for _ in range(60):  # a step costs 20 ms of overhead + 0.5 ms per token-equivalent, and uses its whole budget
        cost = b.value
        b.observe(cost, (20 + 0.5 * cost) / 1e3)
    assert abs(b.value - 160) <= 2  # (100 - 20) / 0.5
    b.observe(10, 5.0)  # a small step (decodes) says little about prompt work: ignored
    assert abs(b.value - 160) <= 2
    fixed = StepBudget(300)
    fixed.observe(300, 10.0)
    assert fixed.value == 300  # no target: the budget is fixed


def test_max_step_ms_shrinks_chunks_when_steps_are_slow():
    """Steps measured at 0.1 ms per token against a 10 ms target: the budget settles near 100 token-equivalents."""
    import time

    engine, ex = _engine(max_num_batched_tokens=256, max_step_ms=10.0, attention_cost_tokens=10**6, block_size=4,
                         num_kv_blocks=1024)
    execute = ex.execute

    def slow(step):
        time.sleep(1e-4 * sum(len(s.token_ids) for s in step.seqs))
        return execute(step)

    ex.execute = slow
    engine.add_request([9] * 4000, SamplingParams(max_tokens=1, temperature=0.0))
    engine.step()
    assert _chunks(ex.steps[-1])[0][2] == 256  # uncalibrated: max_step_cost (= max_num_batched_tokens)
    for _ in range(15):
        engine.step()
    assert 4 <= engine.scheduler.budget.value <= 110  # a loaded machine only makes steps slower
    assert 4 <= _chunks(ex.steps[-1])[0][2] <= 110
    _run(engine)
    _assert_no_leaks(engine)


def test_max_model_len_defaults_to_context_or_cache():
    # the model's context bounds it when the cache is larger ...
    engine = LLMEngine(FakeExecutor(num_kv_blocks=2048, block_size=4, max_position_embeddings=4096),
                       EngineConfig(block_size=4, num_kv_blocks=2048))
    assert engine.max_model_len == 4096
    # ... and the cache of one attention worker when it is smaller
    engine = LLMEngine(FakeExecutor(num_kv_blocks=100, block_size=4), EngineConfig(block_size=4, num_kv_blocks=100))
    assert engine.max_model_len == 400


def test_kv_cache_sizing_for_256k_context():
    """The figures of README "Long context": latent bytes per token and the cache one 256K sequence needs."""
    import json
    from pathlib import Path

    from k2ray.config import ModelArgs

    demo = json.loads((Path(__file__).parents[2] / "k2ray/assets/k2ray-demo/config.json").read_text())
    args = ModelArgs.from_dict(demo)
    demo = demo.get("text_config", demo)  # Kimi K2.5 nests the text model's config
    assert args.kv_cache_dim * args.num_hidden_layers * 4 == 1280  # fp32 bytes per token: 80 x 4 layers x 4
    cfg = EngineConfig(dtype="float32", block_size=16, kv_cache_memory_gb=0.3125)  # 256K x 1280 B = 0.3125 GiB
    assert cfg.kv_blocks_for(args) * 16 == 262144 == args.max_position_embeddings
    # Kimi K2: kv_lora_rank 512 + rope 64 = 576 latent values x 61 layers x 2 bytes (bf16)
    k2 = dict(demo, num_hidden_layers=61, kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128,
              v_head_dim=128, num_attention_heads=64, num_key_value_heads=64, hidden_size=7168, q_lora_rank=1536)
    k2args = ModelArgs.from_dict(k2)
    per_token = k2args.kv_cache_dim * k2args.num_hidden_layers * 2
    assert per_token == 70272  # ~70 KB
    assert 18.4e9 < 262144 * per_token < 18.5e9  # one 256K sequence: ~18.4 GB (17.2 GiB)
    bf16 = EngineConfig(dtype="bfloat16", block_size=64, kv_cache_memory_gb=17.2)
    assert bf16.kv_blocks_for(k2args) * 64 >= 262144
    assert EngineConfig(dtype="bfloat16", block_size=64, kv_cache_memory_gb=17.1).kv_blocks_for(k2args) * 64 < 262144
    # 80 GiB per attention worker (deploy/kimi-k2-thinking.yaml): ~1.22M tokens, four 256K sequences
    assert EngineConfig(dtype="bfloat16", block_size=64, kv_cache_memory_gb=80).kv_blocks_for(k2args) * 64 // 262144 == 4


def test_long_context_settings_are_validated():
    from pydantic import ValidationError

    for bad in ({"attention_cost_tokens": 0}, {"max_step_cost": 0}, {"max_step_ms": 0.0},
                {"max_step_ms": float("inf")}, {"max_step_ms": -5.0}):
        with pytest.raises(ValidationError, match=next(iter(bad))):
            EngineConfig(**bad)
    cfg = EngineConfig(max_num_batched_tokens=512)
    assert (cfg.attention_cost_tokens, cfg.max_step_cost, cfg.max_step_ms) == (8192, None, None)
    engine, _ = _engine(max_num_batched_tokens=512)
    assert engine.scheduler.budget.value == 512  # the default budget: max_num_batched_tokens token-equivalents
