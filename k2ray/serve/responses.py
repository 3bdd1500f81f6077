"""Answering a started request: collect the model group's chunks into the final object, or stream them as SSE, through
an accumulator, recording the request metrics on the way.

An accumulator is the API's side of the answer (:mod:`k2ray.serve.openai.accumulate` for OpenAI's chat and completions;
the Anthropic and Responses APIs wrap the chat one): ``start()`` and ``add(prompt_index, chunk)`` return the stream's
events, ``encode(event, include_usage)`` writes one as SSE text, ``close(include_usage, error)`` the stream's last
events (with the error event when the stream failed after its 200 went out), ``response()`` the non-streamed answer
(a pydantic model) and ``finish_reason`` the first choice's reason, for the metrics.

``answer(..., finalize=...)``: a coroutine function awaited once the answer is complete, before it goes out (the
JSON body, or the stream's closing events): the Responses API stores the response there, so a client that has seen
it end can already find it by id. Its failure is the request's (an error answer / the stream's error event)."""

from __future__ import annotations

import asyncio
import functools
import time
from typing import AsyncIterator, Awaitable, Callable, Optional

from fastapi.responses import JSONResponse, Response, StreamingResponse

from k2ray import metrics
from k2ray.serve import access_log
from k2ray.serve.openai.errors import APIError, from_exception, from_generate_error
from k2ray.serve.router_client import OpenedStream, merged
from k2ray.serve.wire import GenerateChunk, GenerateError


def answers_errors_as(render: Callable[[APIError], Response]):
    """A decorator: an endpoint method's errors become their answers, written by ``render`` in the endpoint's API
    shape (a failure we did not foresee: logged, 500), counted by the instance's ``responder``."""

    def decorate(fn):
        @functools.wraps(fn)
        async def wrapper(self, *args, **kwargs):
            try:
                return await fn(self, *args, **kwargs)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                resp = render(from_exception(e))
                self.responder.count_error(resp.status_code)  # as the client sees it (Anthropic's 529 for a 503)
                return resp

        return wrapper

    return decorate


answers_errors = answers_errors_as(APIError.response)  # OpenAI's error body


class Responder:
    def __init__(self, model_name: str):
        self.model_name = model_name
        self._ttft = metrics.TTFT.labels(model=model_name)
        self._itl = metrics.ITL.labels(model=model_name)
        self._e2e = metrics.E2E_LATENCY.labels(model=model_name)

    def count_error(self, status: int) -> None:
        metrics.REQUEST_ERRORS_TOTAL.inc(model=self.model_name, status=str(status))

    def count_finished(self, reason) -> None:
        metrics.REQUESTS_TOTAL.inc(model=self.model_name, finish_reason=reason or "unknown")

    def _observe(self, t0: float, state: dict, chunk: GenerateChunk, timing: bool) -> None:
        """TTFT/ITL (``timing``: for the first prompt of a batch only) and the access line's token count."""
        now, n_new = time.monotonic(), chunk.num_new_tokens
        access_log.note_tokens(n_new)
        if n_new and timing:
            last = state.get("last")
            (self._ttft if last is None else self._itl).observe(now - (t0 if last is None else last))
            state["last"] = now

    async def answer(self, acc, opened: list[OpenedStream], t0: float, stream: bool, stream_options,
                     finalize: Optional[Callable[[], Awaitable[None]]] = None) -> Response:
        access_log.note_prompt(sum(s.first.num_prompt_tokens or 0 for s in opened))
        # (Serve's proxy sets x-request-id itself; the completion id is in the body)
        headers = {"x-k2ray-group": str(opened[0].first.model_group or "")}
        if stream:
            include_usage = bool(stream_options and stream_options.include_usage)
            return StreamingResponse(self._events(acc, opened, t0, include_usage, finalize),
                                     media_type="text/event-stream", headers=headers)
        state: dict = {}
        try:
            async for j, item in merged(opened):
                if isinstance(item, GenerateError):
                    raise from_generate_error(item)
                self._observe(t0, state, item, timing=j == 0)
                acc.add(j, item)
        except BaseException:
            for s in opened:
                s.cancel()
            raise
        if finalize is not None:
            await finalize()
        self._e2e.observe(time.monotonic() - t0)
        self.count_finished(acc.finish_reason)
        return JSONResponse(acc.response().model_dump(), headers=headers)

    async def _events(self, acc, opened: list[OpenedStream], t0: float, include_usage: bool,
                      finalize: Optional[Callable[[], Awaitable[None]]] = None) -> AsyncIterator[str]:
        """The SSE stream: the accumulator's events as they come; an error mid-stream ends it with one error event."""
        done, state = False, {}
        try:
            for c in acc.start():
                yield acc.encode(c, include_usage)
            error = None
            async for j, item in merged(opened):
                if isinstance(item, GenerateError):
                    error = from_generate_error(item)
                    self.count_error(error.status)
                    break
                self._observe(t0, state, item, timing=j == 0)
                for c in acc.add(j, item):
                    yield acc.encode(c, include_usage)
            else:
                if finalize is not None:
                    await finalize()
                self._e2e.observe(time.monotonic() - t0)
                self.count_finished(acc.finish_reason)
            for text in acc.close(include_usage, error):
                yield text
            done = True
        except Exception as e:  # never a traceback on the wire
            err = from_exception(e)
            self.count_error(err.status)
            for text in acc.close(False, err):
                yield text
            done = True
        finally:
            if not done:  # the client went away: abort the request in the engine
                for s in opened:
                    s.cancel()
                self.count_finished("abort")
