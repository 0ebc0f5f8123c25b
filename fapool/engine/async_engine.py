"""An asyncio front-end over the synchronous LLMEngine.

The engine is single-threaded, so one background thread owns it: every engine call
(add_request, step, abort_request, stats) happens there. The event loop talks to it through a
thread-safe inbox of commands; the thread hands outputs back with call_soon_threadsafe into a
per-request asyncio.Queue. Between steps the thread drains the inbox, so new requests join the
running batch at the next step (continuous batching).

    handler --add/abort/call--> inbox --> [engine thread: drain, step, publish] --outputs--> queues

Admission is bounded: at most `max_waiting` requests may be admitted but not yet scheduled;
past that add_requests raises Overloaded at once (HTTP 429) instead of queueing without bound.
A step that raises fails the requests that were running in it (their KV is freed); the loop
and the waiting requests go on.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from fapool.engine.llm_engine import EngineStats, LLMEngine, RequestError
from fapool.outputs import RequestOutput
from fapool.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class Overloaded(RuntimeError):
    """The waiting queue is full (HTTP 429)."""


class ShuttingDown(RuntimeError):
    """The server is draining and takes no new requests (HTTP 503)."""


class EngineDead(RuntimeError):
    """The engine thread has stopped (HTTP 503)."""


class RequestFailed(RuntimeError):
    """A request that failed inside the engine, or was failed at shutdown (HTTP 500 / 503)."""

    def __init__(self, message: str, shutting_down: bool = False) -> None:
        super().__init__(message)
        self.shutting_down = shutting_down


class Observer(Protocol):
    """Lifecycle events, called on the engine thread (prometheus metrics are thread-safe)."""

    def on_output(self, out: RequestOutput) -> None: ...
    def on_aborted(self, request_id: str) -> None: ...
    def on_failed(self, request_id: str) -> None: ...


@dataclass
class _Add:
    request_id: str
    prompt: str | list[int]
    params: SamplingParams
    arrival_time: float
    accepted: concurrent.futures.Future


@dataclass
class _Abort:
    request_id: str


@dataclass
class _Call:
    fn: Callable[[LLMEngine], Any]
    result: concurrent.futures.Future


class RequestStream:
    """Outputs of one or more engine requests (a prompt list, each with n completions), as
    (index into the list, cumulative RequestOutput), ending when all of them have finished."""

    def __init__(self, request_ids: Sequence[str]) -> None:
        self.request_ids = list(request_ids)
        self._index = {rid: i for i, rid in enumerate(self.request_ids)}
        self._queue: asyncio.Queue = asyncio.Queue()
        self._open = set(self.request_ids)

    @property
    def finished(self) -> bool:
        return not self._open

    def push(self, request_id: str, item: RequestOutput | BaseException) -> None:
        self._queue.put_nowait((self._index[request_id], item))
        if isinstance(item, BaseException) or item.finished:
            self._open.discard(request_id)

    def __aiter__(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        pending = len(self.request_ids)
        while pending:
            index, item = await self._queue.get()
            if isinstance(item, BaseException):
                raise item
            if item.finished:
                pending -= 1
            yield index, item


class AsyncEngine:
    def __init__(
        self,
        engine: LLMEngine,
        max_waiting: int = 256,
        observer: Observer | None = None,
        stats_interval_s: float = 0.05,
    ) -> None:
        self.engine = engine
        self.max_waiting = max_waiting
        self.observer = observer
        self.stats_interval_s = stats_interval_s
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._streams: dict[str, RequestStream] = {}  # event-loop thread only
        # Admitted but not yet scheduled; incremented on the loop, decremented on the engine thread.
        self._lock = threading.Lock()
        self._num_waiting = 0
        self._not_started: set[str] = set()  # engine thread only
        self._accepting = False
        self._drain_deadline: float | None = None  # set at shutdown: fail what is left after it
        self._stopped = threading.Event()
        self._dead_reason: str | None = None
        self._stats = engine.stats()
        self._stats_time = 0.0

    # Lifecycle ----------------------------------------------------------------------------
    async def start(self) -> None:
        """Start the engine thread; from now on only that thread touches the engine."""
        self._loop = asyncio.get_running_loop()
        self._accepting = True
        self._thread = threading.Thread(target=self._run, name="fapool-engine", daemon=True)
        self._thread.start()

    async def shutdown(self, timeout_s: float = 30.0) -> None:
        """Stop admitting, let in-flight requests finish for up to timeout_s, fail the rest
        with RequestFailed(shutting_down=True), and join the engine thread. Idempotent."""
        self.begin_shutdown(timeout_s)
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)

    def begin_shutdown(self, timeout_s: float) -> None:
        self._accepting = False
        if self._drain_deadline is None:
            self._drain_deadline = time.monotonic() + timeout_s
            self._inbox.put(None)  # wake the thread

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._dead_reason is None

    @property
    def accepting(self) -> bool:
        return self._accepting and self.is_running

    @property
    def dead_reason(self) -> str | None:
        return self._dead_reason

    @property
    def num_in_flight(self) -> int:
        """Requests admitted and not yet finished (event-loop thread)."""
        return len(self._streams)

    @property
    def num_waiting(self) -> int:
        """Requests admitted but not yet scheduled (the bounded queue)."""
        return self._num_waiting

    def stats(self) -> EngineStats:
        """The latest snapshot from the engine thread (at most stats_interval_s old while busy)."""
        return self._stats

    # Requests ------------------------------------------------------------------------------
    async def add_requests(
        self,
        items: Sequence[tuple[str, str | list[int], SamplingParams]],
        arrival_time: float | None = None,
    ) -> RequestStream:
        """Admit all (request_id, prompt, params) or none. Raises Overloaded, ShuttingDown,
        EngineDead, or RequestError (bad prompt) once the engine thread has validated them."""
        if not self.is_running:
            raise EngineDead(self._dead_reason or "the engine is not running")
        if not self._accepting:
            raise ShuttingDown("the server is shutting down")
        with self._lock:
            if self._num_waiting + len(items) > self.max_waiting:
                raise Overloaded(
                    f"the server is overloaded: {self._num_waiting} requests are waiting "
                    f"(limit {self.max_waiting}); retry later"
                )
            self._num_waiting += len(items)
        arrival = arrival_time if arrival_time is not None else time.monotonic()
        stream = RequestStream([rid for rid, _, _ in items])
        futures = []
        for rid, prompt, params in items:
            self._streams[rid] = stream
            fut: concurrent.futures.Future = concurrent.futures.Future()
            self._inbox.put(_Add(rid, prompt, params, arrival, fut))
            futures.append(fut)
        try:
            for fut in futures:
                await asyncio.wrap_future(fut)
        except BaseException:
            self.abort(stream)  # one prompt of the list was refused, or the caller went away
            raise
        return stream

    def abort(self, stream: RequestStream) -> None:
        """Cancel the unfinished requests of a stream (client gone); frees their KV blocks."""
        for rid in stream.request_ids:
            if self._streams.pop(rid, None) is not None:
                self._inbox.put(_Abort(rid))

    async def generate(
        self, request_id: str, prompt: str | list[int], params: SamplingParams
    ) -> AsyncIterator[RequestOutput]:
        """One prompt's cumulative outputs; aborts the request if the consumer stops early."""
        stream = await self.add_requests([(request_id, prompt, params)])
        try:
            async for _, out in stream:
                yield out
        finally:
            self.abort(stream)

    async def call(self, fn: Callable[[LLMEngine], Any]) -> Any:
        """Run fn(engine) on the engine thread between steps and return its result."""
        if not self.is_running:
            raise EngineDead(self._dead_reason or "the engine is not running")
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._inbox.put(_Call(fn, fut))
        return await asyncio.wrap_future(fut)

    # Event-loop side -----------------------------------------------------------------------
    def _publish(self, items: list[tuple[str, RequestOutput | BaseException]]) -> None:
        if not items or self._loop is None or self._loop.is_closed():
            return
        try:
            self._loop.call_soon_threadsafe(self._deliver, items)
        except RuntimeError:  # the loop closed under us at exit
            pass

    def _deliver(self, items: list[tuple[str, RequestOutput | BaseException]]) -> None:
        for rid, item in items:
            stream = self._streams.get(rid)
            if stream is None:
                continue  # aborted by its consumer
            stream.push(rid, item)
            if isinstance(item, BaseException) or item.finished:
                del self._streams[rid]

    # Engine thread ------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            device = self.engine.config.device
            if device.startswith("cuda:"):  # a new thread starts on the default device
                import torch

                torch.cuda.set_device(torch.device(device))
            while not self._stopped.is_set():
                busy = self.engine.has_unfinished_requests()
                self._handle_commands(block=not busy)
                if self._drain_deadline is not None and self._drain_done():
                    break
                if self.engine.has_unfinished_requests():
                    self._step()
                else:
                    self.engine.resize_pool()
                self._refresh_stats(force=not self.engine.has_unfinished_requests())
        except BaseException as e:  # a bug in this loop, not in a request: fail everything
            logger.exception("engine loop died")
            self._dead_reason = f"engine loop died: {e!r}"
            self._fail_all(EngineDead(self._dead_reason))
        finally:
            self._accepting = False
            self._stopped.set()
            self._fail_pending_commands()
            self._refresh_stats(force=True)

    def _handle_commands(self, block: bool) -> None:
        """Run every queued command; wait up to 0.1 s for the first one when idle."""
        wait = block
        while True:
            try:
                cmd = self._inbox.get(timeout=0.1) if wait else self._inbox.get_nowait()
            except queue.Empty:
                break
            wait = False
            if isinstance(cmd, _Add):
                self._add(cmd)
            elif isinstance(cmd, _Abort):
                self._abort(cmd.request_id)
            elif isinstance(cmd, _Call):
                try:
                    cmd.result.set_result(cmd.fn(self.engine))
                except Exception as e:  # noqa: BLE001 - handed back to the caller
                    cmd.result.set_exception(e)
            # None only wakes the thread (shutdown)

    def _add(self, cmd: _Add) -> None:
        try:
            self.engine.add_request(cmd.prompt, cmd.params, cmd.request_id, cmd.arrival_time)
        except RequestError as e:
            self._unqueue(cmd.request_id, started=False)
            cmd.accepted.set_exception(e)
            return
        except Exception as e:
            logger.exception("add_request failed for %s", cmd.request_id)
            self._unqueue(cmd.request_id, started=False)
            cmd.accepted.set_exception(RequestFailed(f"the engine could not admit the request: {e!r}"))
            return
        self._not_started.add(cmd.request_id)
        cmd.accepted.set_result(None)

    def _abort(self, request_id: str) -> None:
        if request_id not in self.engine.groups:
            return  # already finished, or never admitted
        self.engine.abort_request(request_id)
        self._unqueue(request_id)
        self._notify("on_aborted", request_id)

    def _unqueue(self, request_id: str, started: bool = True) -> None:
        """The request no longer counts against the waiting bound."""
        if started and request_id not in self._not_started:
            return
        self._not_started.discard(request_id)
        with self._lock:
            self._num_waiting -= 1

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as e:
            logger.exception("engine step failed; failing the running requests")
            self._fail_running(e)
            return
        published: list[tuple[str, RequestOutput | BaseException]] = []
        for out in outputs:
            self._unqueue(out.request_id)
            # The engine keeps mutating the metrics object; the loop gets a snapshot.
            out = dataclasses.replace(out, metrics=dataclasses.replace(out.metrics))
            self._notify("on_output", out)
            published.append((out.request_id, out))
        self._publish(published)

    def _fail_running(self, error: Exception) -> None:
        """After a failed step the running requests' state is unknown: abort them (freeing
        their KV) and report the error to their clients. Waiting requests are untouched."""
        running = {r.group_id for r in self.engine.scheduler.running}
        self._fail(running, RequestFailed(f"the engine failed while running this request: {error!r}"))

    def _fail(self, request_ids: set[str], error: BaseException) -> None:
        published: list[tuple[str, RequestOutput | BaseException]] = []
        for rid in request_ids:
            try:
                self.engine.abort_request(rid)
            except Exception:
                logger.exception("abort of %s failed", rid)
                self.engine.groups.pop(rid, None)
            self._unqueue(rid)
            self._notify("on_failed", rid)
            published.append((rid, error))
        self._publish(published)

    def _fail_all(self, error: BaseException) -> None:
        try:
            self._fail(set(self.engine.groups), error)
        except Exception:  # noqa: BLE001 - the loop is already dying; reach the clients anyway
            self._publish([(rid, error) for rid in list(self.engine.groups)])

    def _drain_done(self) -> bool:
        """At shutdown: True once nothing is left, or the deadline has passed (failing the rest)."""
        if not self.engine.has_unfinished_requests() and not self.engine.groups:
            return True
        if time.monotonic() < self._drain_deadline:
            return False
        self._fail(
            set(self.engine.groups), RequestFailed("the server shut down before this request finished", True)
        )
        return True

    def _fail_pending_commands(self) -> None:
        while True:
            try:
                cmd = self._inbox.get_nowait()
            except queue.Empty:
                return
            if isinstance(cmd, _Add):
                with self._lock:
                    self._num_waiting -= 1
                cmd.accepted.set_exception(ShuttingDown("the server is shutting down"))
            elif isinstance(cmd, _Call):
                cmd.result.set_exception(EngineDead("the engine has stopped"))

    def _notify(self, event: str, arg: Any) -> None:
        if self.observer is None:
            return
        try:
            getattr(self.observer, event)(arg)
        except Exception:
            logger.exception("observer %s failed", event)

    def _refresh_stats(self, force: bool) -> None:
        now = time.monotonic()
        if force or now - self._stats_time >= self.stats_interval_s:
            try:
                self._stats = self.engine.stats()
            except Exception:
                logger.exception("engine.stats() failed")
            self._stats_time = now
