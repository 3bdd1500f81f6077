"""The async streaming front: concurrent streams, deltas, cancellation, executor failure, shutdown."""

from __future__ import annotations

import asyncio

import pytest

from k2ray.engine.request import EngineDeadError
from k2ray.runtime.sampling import SamplingParams

from .engine_helpers import run_to_completion


def _collect(engine, prompt, params, rid=None):
    async def go():
        outs = []
        async for out in engine.stream(prompt, params, request_id=rid):
            outs.append(out)
        return outs

    return go()


def test_concurrent_streams_match_sync_results(make_engine):
    prompts = [[10 + i, 20 + i, 30 + i, 40] for i in range(6)]
    params = [SamplingParams(temperature=0.0, max_tokens=3 + i, ignore_eos=True, logprobs=1) for i in range(6)]
    sync = make_engine()
    expected = []
    for p, sp in zip(prompts, params):
        rid = sync.add_request(p, sp)
        expected.append(run_to_completion(sync)[rid].outputs[0])

    engine = make_engine(max_num_seqs=4)

    async def main():
        return await asyncio.gather(*(_collect(engine, p, sp) for p, sp in zip(prompts, params)))

    results = asyncio.run(main())
    for outs, exp in zip(results, expected):
        last = outs[-1]
        assert last.finished and all(not o.finished for o in outs[:-1])
        assert last.outputs[0].token_ids == exp.token_ids
        # deltas add up to the cumulative result
        assert [t for o in outs for t in o.outputs[0].delta_token_ids] == exp.token_ids
        assert "".join(o.outputs[0].delta_text for o in outs) == exp.text
        assert sum(len(o.outputs[0].delta_logprobs) for o in outs) == len(exp.token_ids)
    assert engine.num_running == 0 and engine.kv_cache_usage() == 0.0
    # text prompts go through the tokenizer
    outs = asyncio.run(_collect(engine, "hello", SamplingParams(temperature=0.0, max_tokens=4)))
    assert outs[-1].prompt == "hello" and outs[-1].prompt_token_ids == engine.tokenizer.encode("hello")
    # validate first, stream later
    req = engine.prepare_request(prompts[0], params[0], request_id="pre")
    outs = asyncio.run(_collect(engine, req, None))
    assert outs[-1].request_id == "pre" and outs[-1].outputs[0].token_ids == expected[0].token_ids
    m = engine.metrics()
    assert m["num_running"] == 0 and m["num_finished"] == 8 and m["num_generation_tokens"] > 0
    assert set(m["phase_time_s"]) == {"schedule", "execute", "process"}


def test_leaving_a_stream_aborts_its_request(make_engine):
    engine = make_engine()

    async def main():
        long = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)
        got = 0
        async for out in engine.stream([1, 2, 3], long, request_id="quitter"):
            got += 1
            if got == 2:
                break
        short = await engine.generate([4, 5, 6], SamplingParams(temperature=0.0, max_tokens=5))
        for _ in range(100):  # the abort is applied by the loop thread
            if engine.get_request("quitter") is None:
                break
            await asyncio.sleep(0.01)
        return short

    short = asyncio.run(main())
    assert short.finished and len(short.outputs[0].token_ids) <= 5
    assert engine.get_request("quitter") is None
    assert engine.kv_cache_usage() == 0.0 and engine.num_aborted == 1


def test_invalid_request_raises_in_the_caller_only(make_engine):
    engine = make_engine(num_kv_blocks=8)

    async def main():
        ok = asyncio.ensure_future(engine.generate([1, 2, 3], SamplingParams(temperature=0.0, max_tokens=6)))
        with pytest.raises(ValueError, match="max_model_len"):
            async for _ in engine.stream(list(range(1, 100)), SamplingParams()):
                pass
        with pytest.raises(ValueError, match="outside the vocabulary"):
            await engine.generate([10**9], SamplingParams())
        return await ok

    out = asyncio.run(main())
    assert out.finished and len(out.outputs[0].token_ids) >= 1


def test_executor_failure_reaches_every_stream(make_engine):
    engine = make_engine()
    engine.executor.fail_at = 4

    async def main():
        tasks = [asyncio.ensure_future(_collect(engine, [7, 8, 9 + i], SamplingParams(max_tokens=50, ignore_eos=True)))
                 for i in range(5)]
        return await asyncio.gather(*tasks, return_exceptions=True)

    results = asyncio.run(main())
    assert len(results) == 5
    for r in results:
        assert isinstance(r, EngineDeadError) and "injected executor failure" in str(r)
    with pytest.raises(EngineDeadError):
        engine.add_request([1, 2], SamplingParams())
    with pytest.raises(EngineDeadError):
        asyncio.run(_collect(engine, [1, 2], SamplingParams()))
    assert engine.num_running == 0


def test_sync_step_failure_marks_engine_dead(make_engine):
    engine = make_engine()
    engine.executor.fail_at = 2
    engine.add_request([1, 2, 3], SamplingParams(max_tokens=10, ignore_eos=True))  # a sampled EOS would end it early
    engine.step()
    with pytest.raises(RuntimeError, match="injected"):
        engine.step()
    assert not engine.has_unfinished_requests()
    with pytest.raises(EngineDeadError, match="injected"):
        engine.step()


def test_shutdown_ends_open_streams(make_engine):
    engine = make_engine()

    async def main():
        task = asyncio.ensure_future(_collect(engine, [3, 4, 5], SamplingParams(max_tokens=10_000, ignore_eos=True)))
        await asyncio.sleep(0.2)
        await asyncio.get_running_loop().run_in_executor(None, engine.shutdown)
        return await asyncio.gather(task, return_exceptions=True)

    (res,) = asyncio.run(main())
    assert isinstance(res, EngineDeadError) and "shut down" in str(res)
    engine.shutdown()  # idempotent
    with pytest.raises(EngineDeadError):
        engine.add_request([1], SamplingParams())
