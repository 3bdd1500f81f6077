"""The ingress's view of the model groups: start a request on one (retrying while groups are not ready), read its
stream, ask a group for its status and files. :class:`RouterClient` does it through the K2Router deployment's Serve
handle; tests give the ingress any object with the same methods (:class:`ModelGroups`)."""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator, Protocol, Union

from k2ray.serve.openai.errors import APIError, from_generate_error
from k2ray.serve.wire import GenerateChunk, GenerateError, GenerateRequest

OPEN_ATTEMPTS = 4  # tries to start a request while model groups are not ready

StreamItem = Union[GenerateChunk, GenerateError]


class OpenedStream(Protocol):
    first: GenerateChunk

    def __aiter__(self) -> AsyncIterator[StreamItem]: ...  # the first chunk, then the rest

    def cancel(self) -> None: ...


class ModelGroups(Protocol):
    async def open(self, req: GenerateRequest) -> OpenedStream: ...
    async def status(self) -> dict: ...
    async def tokenizer_files(self) -> dict[str, bytes]: ...
    async def info(self) -> dict: ...
    async def layout(self) -> dict: ...
    async def stats(self) -> dict: ...
    async def rebalance(self) -> dict: ...
    async def resize(self, attention_workers: int | None, expert_shards: int | None) -> dict: ...


class _HandleStream:
    def __init__(self, gen, first: GenerateChunk):
        self._gen, self.first = gen, first

    async def __aiter__(self) -> AsyncIterator[StreamItem]:
        yield self.first
        async for item in self._gen:
            yield item

    def cancel(self) -> None:
        self._gen.cancel()


class RouterClient:
    """:class:`ModelGroups` over a Serve deployment handle to ``K2Router``."""

    def __init__(self, handle):
        self.handle = handle

    async def open(self, req: GenerateRequest) -> OpenedStream:
        """A model group that is not ready (starting, recovering) or whose router died has not started the request,
        so it is sent again, up to ``OPEN_ATTEMPTS`` times in all: with several groups Serve's replica choice then
        usually reaches one that serves. Any other error is raised as :class:`APIError`."""
        from ray.exceptions import RayActorError

        for attempt in range(OPEN_ATTEMPTS):
            last = attempt == OPEN_ATTEMPTS - 1
            gen = self.handle.options(stream=True).generate.remote(req)
            try:
                first = await gen.__anext__()
            except StopAsyncIteration:
                raise APIError(500, "internal server error", "internal_error", None, "internal_error") from None
            except RayActorError:
                gen.cancel()
                if last:
                    raise
                continue
            except BaseException:
                gen.cancel()
                raise
            if isinstance(first, GenerateError):
                gen.cancel()
                if first.retry_elsewhere and not last:
                    continue
                raise from_generate_error(first)
            return _HandleStream(gen, first)
        raise AssertionError("unreachable")  # pragma: no cover

    async def status(self) -> dict:
        return await self.handle.status.remote()

    async def tokenizer_files(self) -> dict[str, bytes]:
        return await self.handle.tokenizer_files.remote()

    async def info(self) -> dict:
        return await self.handle.info.remote()

    async def layout(self) -> dict:
        return await self.handle.layout.remote()

    async def stats(self) -> dict:
        return await self.handle.stats.remote()

    async def rebalance(self) -> dict:
        return await self.handle.rebalance.remote()

    async def resize(self, attention_workers: int | None, expert_shards: int | None) -> dict:
        return await self.handle.resize.remote(attention_workers, expert_shards)


async def open_all(groups: ModelGroups, reqs: list[GenerateRequest]) -> list[OpenedStream]:
    """Start every prompt of a batch; if one cannot start, cancel the others."""
    opened: list[OpenedStream] = []
    try:
        for req in reqs:
            opened.append(await groups.open(req))
    except BaseException:
        for s in opened:
            s.cancel()
        raise
    return opened


async def merged(opened: list[OpenedStream]) -> AsyncIterator[tuple[int, Any]]:
    """The items of several streams as they come: ``(stream index, item)``."""
    if len(opened) == 1:
        async for item in opened[0]:
            yield 0, item
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(j: int, stream: OpenedStream):
        try:
            async for item in stream:
                await queue.put((j, item))
        except BaseException as e:
            await queue.put((j, e))
        finally:
            await queue.put((j, None))

    tasks = [asyncio.ensure_future(pump(j, s)) for j, s in enumerate(opened)]
    left = len(tasks)
    try:
        while left:
            j, item = await queue.get()
            if item is None:
                left -= 1
                continue
            if isinstance(item, BaseException):
                raise item
            yield j, item
    finally:
        for t in tasks:
            t.cancel()
