"""An asyncio front for the engine: many coroutines submit, one thread steps.

The engine is single-threaded by design, so every call into it happens on one background
thread: submissions and aborts are queued to it as commands, and each step's outputs are
handed back to the submitting coroutine's queue on its event loop. The torch ops release the
GIL, so the event loop stays responsive while a step runs. Cancelling the coroutine that
consumes a request (client disconnect, timeout) aborts the request and frees its blocks.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import queue
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llm_engine.runtime.engine import Engine
from llm_engine.runtime.output import Output
from llm_engine.runtime.sampling_params import SamplingParams


class EngineDeadError(RuntimeError):
    """The engine loop stopped (a step raised, or a rank of a multi-rank engine died); no
    request can run until a restart."""


@dataclass
class _Sink:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue


class AsyncEngine:
    def __init__(self, engine: Engine, *, owns_engine: bool = False) -> None:
        """`owns_engine`: shutdown() also closes the engine (AsyncEngine.load does)."""
        self.engine = engine
        self._owns_engine = owns_engine
        self._commands: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._sinks: dict[str, _Sink] = {}
        self._stop = False
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="engine-loop", daemon=True)
        self._thread.start()

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu", **options: Any) -> AsyncEngine:
        """Engine.load's options (EngineConfig fields, speculative decoding's included)."""
        return cls(Engine.load(path, device, **options), owns_engine=True)

    # ---- the loop thread ------------------------------------------------------------------
    def _call(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        """Run fn on the loop thread; returns a future of its result."""
        if self.error is None and not self.engine.healthy:  # a rank died between steps
            self.error = EngineDeadError(self.engine.error)
        if self.error is not None or self._stop:
            raise EngineDeadError(f"the engine has stopped ({self.error or 'shut down'})")
        fut: concurrent.futures.Future = concurrent.futures.Future()

        def run() -> None:
            # The caller may have been cancelled while this waited in the queue (its asyncio
            # future cancels this one): then skip the call. Setting a result on a cancelled
            # future raises InvalidStateError, which would end the loop thread.
            if not fut.set_running_or_notify_cancel():
                return
            try:
                fut.set_result(fn())
            except BaseException as e:
                fut.set_exception(e)

        self._commands.put(run)
        self._wake.set()
        return fut

    def _loop(self) -> None:
        try:
            while not self._stop:
                while True:
                    try:
                        self._commands.get_nowait()()
                    except queue.Empty:
                        break
                if not self.engine.has_unfinished():
                    self._wake.wait(timeout=0.5)
                    self._wake.clear()
                    continue
                for out in self.engine.step():
                    self._deliver(out)
        except BaseException as e:  # a step failed: fail every waiting request, stay alive
            self.error = e
            for rid in list(self._sinks):
                self._deliver_error(rid, e)
            return
        # shut down: consumers still waiting would otherwise wait forever
        stopped = EngineDeadError("the engine was shut down")
        for rid in list(self._sinks):
            self._deliver_error(rid, stopped)

    def _deliver(self, out: Output) -> None:
        sink = self._sinks.get(out.request_id)
        if sink is None:
            return
        if out.finished:
            del self._sinks[out.request_id]
        if not self._put(sink, out) and not out.finished:
            # The consumer's event loop is gone (asyncio.run returned mid-stream): nobody can
            # read this request any more, so free its blocks rather than generate on.
            self._sinks.pop(out.request_id, None)
            self.engine.abort(out.request_id)

    def _deliver_error(self, rid: str, error: BaseException) -> None:
        sink = self._sinks.pop(rid, None)
        if sink is not None:
            self._put(sink, error)

    @staticmethod
    def _put(sink: _Sink, item: Any) -> bool:
        try:
            sink.loop.call_soon_threadsafe(sink.queue.put_nowait, item)
        except RuntimeError:  # "Event loop is closed": must not end the loop thread
            return False
        return True

    # ---- the asyncio side -------------------------------------------------------------------
    async def generate(self, prompt: str | Sequence[int], params: SamplingParams | None = None,
                       *, request_id: str | None = None, priority: int = 0,
                       cache_salt: str | None = None) -> AsyncIterator[Output]:
        """Submit a request and yield its Outputs as they come (the last one has
        finish_reason set). Raises ValueError at once for a bad prompt or params."""
        loop = asyncio.get_running_loop()
        sink = _Sink(loop, asyncio.Queue())

        def add() -> str:
            rid = self.engine.add_request(prompt, params, request_id=request_id,
                                          priority=priority, cache_salt=cache_salt)
            self._sinks[rid] = sink
            return rid

        submitted = self._call(add)
        try:
            rid = await asyncio.wrap_future(submitted)
        except asyncio.CancelledError:
            # Cancelled while add() was queued: it is skipped. If it had already started, it
            # still adds the request, which nobody would read: abort it once it is in.
            submitted.add_done_callback(self._abort_orphan)
            raise
        finished = False
        try:
            while not finished:
                item = await sink.queue.get()
                if isinstance(item, BaseException):
                    raise EngineDeadError(f"the engine failed: {item}") from item
                finished = item.finished
                yield item
        finally:
            if not finished and self.error is None and not self._stop:
                self._call(lambda: self._abort(rid))

    async def complete(self, prompt: str | Sequence[int], params: SamplingParams | None = None,
                       **kwargs: Any) -> Output:
        """The final Output of one request."""
        last = None
        async for last in self.generate(prompt, params, **kwargs):  # noqa: B007
            pass
        assert last is not None
        return last

    def _abort_orphan(self, submitted: concurrent.futures.Future) -> None:
        if submitted.cancelled() or submitted.exception() is not None:
            return
        with contextlib.suppress(EngineDeadError):
            self._call(lambda: self._abort(submitted.result()))

    def _abort(self, rid: str) -> None:
        self._sinks.pop(rid, None)
        self.engine.abort(rid)

    async def abort(self, request_id: str) -> None:
        def run() -> None:
            out = self.engine.abort(request_id)
            if out is not None:
                self._deliver(out)

        await asyncio.wrap_future(self._call(run))

    async def run_sync(self, fn: Callable[[Engine], Any]) -> Any:
        """Run fn(engine) on the loop thread (tokenizer calls, stats) and await its result."""
        return await asyncio.wrap_future(self._call(lambda: fn(self.engine)))

    @property
    def alive(self) -> bool:
        return (self.error is None and not self._stop and self._thread.is_alive()
                and self.engine.healthy)

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout)
        if self._owns_engine:
            self.engine.close()
