"""One request never hurts another, at the router (issue 20), Ray-free: a K2Router over the local executor, driven
through ``generate`` as the ingress drives it. A slow request preparation (grammar compilation) leaves the router's
event loop free; a failure of one request inside a step is a 500 for that request only; a malformed schema is a 400
naming the part at fault."""

from __future__ import annotations

import asyncio
import time

import pytest

from k2ray.runtime import runner
from k2ray.runtime.guided import GuidedDecoding
from k2ray.runtime.sampling import SamplingParams
from k2ray.serve.wire import GenerateChunk, GenerateError, GenerateRequest

PARAMS = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
PROMPTS = {"a": [5, 17, 300, 41], "b": [9, 8, 7, 6, 5, 4], "c": [1000, 12, 77]}


@pytest.fixture(scope="module")
def router(tiny_model_dir):
    from k2ray.serve.router import K2Router

    r = K2Router({"model": str(tiny_model_dir), "served_model_name": "tiny",
                  "engine": {"num_kv_blocks": 256, "block_size": 4, "max_num_seqs": 8},
                  "parallel": {"executor": "local", "attention_workers": 1, "expert_shards": 1}})
    yield r
    r._stop.set()
    r.engine.shutdown()


async def _collect(router, rid: str, prompt, params=PARAMS):
    """(token ids, the error if the stream ended with one)."""
    tokens: list[int] = []
    async for item in router.generate(GenerateRequest(rid, list(prompt), params)):
        if isinstance(item, GenerateError):
            return tokens, item
        assert isinstance(item, GenerateChunk)
        for d in item.outputs:
            tokens += d.token_ids
    return tokens, None


async def _all(router, suffix: str, prompts=PROMPTS):
    res = await asyncio.gather(*(_collect(router, rid + suffix, p) for rid, p in prompts.items()))
    return dict(zip(prompts, res))


def test_a_slow_preparation_leaves_the_event_loop_free(router, monkeypatch):
    """Grammar compilation (or any slow preparation) runs on the router's prepare pool: while one request spends a
    second there, the event loop keeps ticking and another request streams to its end."""
    engine = router.engine
    real = engine.prepare_request

    def slow_prepare(prompt, params=None, request_id=None, arrival_time=None, images=None):
        if request_id == "slow":
            time.sleep(1.0)  # what a big JSON schema costs xgrammar
        return real(prompt, params, request_id, arrival_time, images)

    monkeypatch.setattr(engine, "prepare_request", slow_prepare)

    async def main():
        gaps, stop = [], asyncio.Event()

        async def ticker():
            last = time.perf_counter()
            while not stop.is_set():
                await asyncio.sleep(0.01)
                now = time.perf_counter()
                gaps.append(now - last)
                last = now

        tick = asyncio.create_task(ticker())
        t0 = time.perf_counter()
        slow = asyncio.create_task(_collect(router, "slow", PROMPTS["a"]))
        await asyncio.sleep(0.05)
        fast = await _collect(router, "fast", PROMPTS["b"])
        fast_done = time.perf_counter() - t0
        slow_res = await slow
        slow_done = time.perf_counter() - t0
        stop.set()
        await tick
        return gaps, fast, slow_res, fast_done, slow_done

    gaps, fast, slow, fast_done, slow_done = asyncio.run(main())
    assert fast[1] is None and len(fast[0]) == 12 and slow[1] is None and len(slow[0]) == 12
    assert slow_done >= 1.0
    assert fast_done < slow_done  # the fast request did not wait for the slow one's preparation
    assert max(gaps) < 0.5, max(gaps)  # the loop never stood still for the second of preparation


def test_a_failure_inside_one_request_is_a_500_for_it_alone(router, monkeypatch):
    baseline = asyncio.run(_all(router, "-base"))
    assert all(err is None and len(toks) == 12 for toks, err in baseline.values())
    engine = router.engine
    real = engine.prepare_request

    def arm(prompt, params=None, request_id=None, arrival_time=None, images=None):
        req = real(prompt, params, request_id, arrival_time, images)
        if request_id == "b-fail":
            runner.FAIL_SAMPLING_FOR_SEQ_IDS.update(s.seq_id for s in req.seqs)
        return req

    monkeypatch.setattr(engine, "prepare_request", arm)
    try:
        failed = asyncio.run(_all(router, "-fail"))
    finally:
        runner.FAIL_SAMPLING_FOR_SEQ_IDS.clear()
    toks, err = failed["b"]
    assert err is not None and err.status == 500 and err.type == "internal_error" and not err.retry_elsewhere
    assert "/" not in err.message and "Error(" not in err.message and "pid" not in err.message.lower()
    assert {k: v for k, v in failed.items() if k != "b"} == {k: v for k, v in baseline.items() if k != "b"}
    # the group was not torn down: same engine, still ready, and the failed prompt is served again
    assert router.engine is engine and router.status()["state"] == "ready"
    assert asyncio.run(_collect(router, "b-again", PROMPTS["b"])) == baseline["b"]


@pytest.mark.parametrize("value", [None, "abc"])
def test_malformed_schema_is_a_400_naming_the_part(router, value):
    schema = {"type": "object", "properties": {"city": {"type": "string", "minLength": value}}}
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": schema}}]
    for guided, param in ((GuidedDecoding(json_schema=schema), "json_schema"),
                          (GuidedDecoding(tools=tools, tool_choice="required"), "tools")):
        toks, err = asyncio.run(_collect(router, f"bad-{param}", [1, 2, 3],
                                         SamplingParams(max_tokens=4, guided_decoding=guided)))
        assert toks == [] and err is not None
        assert err.status == 400 and err.param == param and "minLength" in err.message
    assert router.status()["inflight"] == 0
