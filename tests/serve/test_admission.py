"""Fast refusal, without Ray: when the model groups are full, a generation request is refused with 503 before it is
read or tokenized, in milliseconds; a slot is held until the whole response (stream included) is sent."""

from __future__ import annotations

import asyncio
import time

import httpx
from k2ray.serve.ingress import OpenAIIngress
from k2ray.tokenizer import KimiTokenizer
from k2ray.tokenizer.tiny import DATA_DIR

from .test_openai_frontend import MODEL, ScriptedGroups, _Stream


class HeldGroups(ScriptedGroups):
    """Streams that do not finish until ``release`` is set."""

    def __init__(self, tokenizer):
        super().__init__(tokenizer)
        self.release = asyncio.Event()

    async def open(self, req):
        self.requests.append(req)
        chunks = self._chunks(req)
        release = self.release

        class Held(_Stream):
            async def __aiter__(self):
                yield chunks[0]
                await release.wait()
                for c in chunks[1:]:
                    yield c

        return Held(chunks)


def _app(per_group_seqs: int, queued: int):
    groups = HeldGroups(KimiTokenizer.from_dir(DATA_DIR))
    ingress = OpenAIIngress(groups, {"model": "k2ray-tiny", "served_model_name": MODEL,
                                     "engine": {"max_num_seqs": per_group_seqs}, "max_queued_requests": queued})
    return ingress, groups


def test_full_groups_refuse_at_once_without_reading_the_request():
    ingress, groups = _app(per_group_seqs=2, queued=1)  # a group holds 3 requests
    app = ingress.build_asgi_app()
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "stream": True, "max_tokens": 8}

    async def scenario():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            async def stream():
                async with client.stream("POST", "/v1/chat/completions", json=body) as r:
                    return r.status_code, "".join([c async for c in r.aiter_text()])

            held = [asyncio.create_task(stream()) for _ in range(3)]
            while len(groups.requests) < 3:  # all three started on the group
                await asyncio.sleep(0.01)
            t0 = time.perf_counter()
            refused = await client.post("/v1/completions", json={"model": MODEL, "prompt": "x" * 100_000})
            refuse_s = time.perf_counter() - t0
            assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
            assert refused.json()["error"]["code"] == "overloaded"
            assert len(groups.requests) == 3  # never tokenized, never sent to a group
            assert (await client.get("/health")).status_code == 200  # other endpoints unaffected
            groups.release.set()
            done = await asyncio.gather(*held)
            assert all(status == 200 and text.endswith("data: [DONE]\n\n") for status, text in done)
            again = await client.post("/v1/chat/completions", json={**body, "stream": False})
            assert again.status_code == 200  # the slots were given back when the streams ended
            return refuse_s

    refuse_s = asyncio.run(scenario())
    assert refuse_s < 0.1, refuse_s


def test_capacity_grows_with_the_ready_groups_seen():
    from k2ray.serve.admission import AdmissionMiddleware, GroupWatch

    watch = GroupWatch()
    admission = AdmissionMiddleware(app=None, watch=watch, per_group=6)
    assert admission.capacity == 6  # no group seen yet: assume one
    watch.saw("g1")
    watch.saw("g2")
    watch.saw("g2")
    assert admission.capacity == 12
    watch.saw("g1", ready=False)  # a group that reports itself not ready (recovering) stops counting
    assert admission.capacity == 6
