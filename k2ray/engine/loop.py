"""The step thread behind ``LLMEngine.stream``: it owns the engine while streams are open.

Other threads never touch the scheduler: they post an :class:`~k2ray.engine.messages.Add` or
:class:`~k2ray.engine.messages.Abort` to the inbox and wake the thread. The thread applies the inbox, runs steps while
there is work and hands each output to its stream's :class:`~k2ray.engine.messages.Sink`. When the engine dies or
shuts down, every open stream (and every stream still waiting in the inbox) gets the engine's
:class:`~k2ray.engine.request.EngineDeadError`.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Optional, Protocol

from k2ray.engine.messages import Abort, Add, Message, Sink
from k2ray.engine.request import EngineDeadError, RequestOutput
from k2ray.engine.scheduler import Scheduler


_PENDING_POLL_S = 0.05  # how often an idle loop looks at a pending resize


class SteppedEngine(Protocol):
    """What the loop needs of the engine (``LLMEngine``), called on the loop's thread only."""

    scheduler: Scheduler

    def step(self) -> list[RequestOutput]: ...

    def handle(self, msg: Message) -> Optional[RequestOutput]: ...  # apply an Add / Abort

    def fail(self, e: BaseException) -> None: ...  # end every request with an error

    def follow_layout(self) -> bool: ...  # step towards a pending pool resize; True while one is pending

    def dead_error(self) -> EngineDeadError: ...  # what open streams receive at the end


class StepLoop:
    """The background thread of one engine, with its inbox and the sinks of its open streams."""

    def __init__(self, engine: SteppedEngine):
        self.engine = engine
        self.thread: Optional[threading.Thread] = None
        self._inbox: deque[Message] = deque()
        self._wake = threading.Event()
        self._stopping = False
        self._sinks: dict[str, Sink] = {}

    @property
    def running(self) -> bool:
        """The thread was started (from then on it alone steps the engine)."""
        return self.thread is not None

    def on_thread(self) -> bool:
        return threading.current_thread() is self.thread

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name="k2ray-engine-loop", daemon=True)
        self.thread.start()

    def wake(self) -> None:
        """Have the thread look at its work again (a resize became pending)."""
        self._wake.set()

    def post(self, msg: Message) -> None:
        """Queue a message for the thread (any thread)."""
        if self.thread is None and isinstance(msg, Add):
            raise RuntimeError("background loop is not running")
        self._inbox.append(msg)
        self._wake.set()

    def stop(self, timeout_s: float = 60.0) -> None:
        """Stop the thread (its streams get the engine's error as it exits); without one, fail what is queued."""
        self._stopping = True
        self._wake.set()
        if self.thread is not None and not self.on_thread():
            self.thread.join(timeout=timeout_s)
        if self.thread is None:
            self._fail_streams()

    def _run(self) -> None:
        engine = self.engine
        try:
            while not self._stopping:
                self._wake.clear()
                self._drain_inbox()
                if not engine.scheduler.has_work():
                    # An idle group still follows a resize (its switch waits for a step boundary, and this is one).
                    self._wake.wait(_PENDING_POLL_S if engine.follow_layout() else None)
                    continue
                if self._stopping:
                    break
                for out in engine.step():
                    self._deliver(out)
        except BaseException as e:  # executor failure (already recorded by step) or a bug in the loop
            engine.fail(e)
        finally:
            self._fail_streams()

    def _drain_inbox(self) -> None:
        while self._inbox:
            msg = self._inbox.popleft()
            if isinstance(msg, Add) and msg.sink is not None:
                self._sinks[msg.request.request_id] = msg.sink
            out = self.engine.handle(msg)
            if isinstance(msg, Abort):
                sink = self._sinks.pop(msg.request_id, None)
                if sink is not None and out is not None:
                    sink.put(out)

    def _deliver(self, out: RequestOutput) -> None:
        sink = self._sinks.get(out.request_id)
        if sink is None:
            return
        if out.finished:
            del self._sinks[out.request_id]
        if not sink.put(out):  # nobody listens any more: stop generating for it
            self._sinks.pop(out.request_id, None)
            self.engine.handle(Abort(out.request_id))

    def _fail_streams(self) -> None:
        err = self.engine.dead_error()
        while self._inbox:  # requests that never reached the scheduler
            msg = self._inbox.popleft()
            if isinstance(msg, Add) and msg.sink is not None:
                msg.sink.put(err)
        for sink in self._sinks.values():
            sink.put(err)
        self._sinks.clear()
