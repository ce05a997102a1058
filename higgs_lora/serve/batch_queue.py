"""A queue that batches concurrent requests for one `VoiceCloner`, run by a single worker thread.

The model runs one batch at a time, one piece of text per request per batch (`VoiceCloner.step`). Between two
batches the worker takes in the requests that arrived and picks the next batch round-robin: the requests served
longest ago first (up to the cloner's `max_batch`, one adapter per batch). So a long text, spoken sentence by
sentence, shares the model with the requests that arrive after it instead of holding them back until its last
sentence. Each request gets its audio back chunk by chunk on its own asyncio queue, so the REST endpoint (which
waits for the last chunk) and the WebSocket stream (which forwards every chunk) share one path.

`submit` refuses a request with `QueueFull` when `max_pending` requests are already queued or running: the server
answers 429 rather than letting latency grow without bound. Anything a batch raises fails that batch's requests
only (`BatchFailed`, a 500 with the message); the worker goes on. `health()` says whether the worker is alive and
not stuck, for `/health`.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from dataclasses import dataclass, field

from higgs_lora.infer.cloner import CloneRequest, InferenceError, VoiceCloner
from higgs_lora.logs import get_logger

log = get_logger("serve")


class QueueFull(RuntimeError):
    """Too many requests pending; try again later."""


class BatchFailed(RuntimeError):
    """A batch raised something unexpected; its requests fail with this message, the worker goes on."""


class Unavailable(RuntimeError):
    """The worker stopped (the server is shutting down, or it died); the request cannot be served."""


@dataclass(eq=False)
class Ticket:
    """A submitted request and where its chunks go (compared by identity)."""

    request: CloneRequest
    loop: asyncio.AbstractEventLoop
    chunks: asyncio.Queue = field(default_factory=asyncio.Queue)
    """Receives numpy chunks, then the CloneResult, or an Exception."""
    submitted: float = field(default_factory=time.perf_counter)
    job: object = None
    """The cloner's running state of the request once the worker started it."""
    cancelled: bool = False
    """Set by the server when the client went away: the worker drops the request at the next batch."""


class BatchQueue:
    """Collects requests and runs them, piece by piece and round-robin, in batches on one worker thread."""

    def __init__(
        self, cloner: VoiceCloner, max_pending: int = 32, wait_seconds: float = 0.02, stall_seconds: float = 300.0
    ):
        self.cloner, self.max_pending, self.wait_seconds = cloner, max_pending, wait_seconds
        self.stall_seconds = stall_seconds
        self._queue: queue.Queue[Ticket | None] = queue.Queue()
        self._active: list[Ticket] = []
        """Started requests, the one served longest ago first (worker thread only)."""
        self._pending = 0
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self.batches_run = 0
        self.largest_batch = 0
        self.failed_batches = 0
        self.step_seconds = 0.0
        """Moving average of one batch's time (one piece per request; for Retry-After)."""
        self._beat = time.monotonic()
        self._busy = False
        self.died: str | None = None
        """Why the worker thread ended, if it did other than by `close`."""
        self._thread = threading.Thread(target=self._work, name="higgs-lora-batches", daemon=True)
        self._thread.start()

    @property
    def pending(self) -> int:
        return self._pending

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._closing.is_set()

    def health(self) -> tuple[bool, str]:
        """(ok, why not): the worker thread is alive and, when busy, has made progress within `stall_seconds`."""
        if not self._thread.is_alive():
            return False, f"the batch worker stopped: {self.died or 'shut down'}"
        quiet = time.monotonic() - self._beat
        if self._busy and quiet > self.stall_seconds:
            return False, f"the batch worker made no progress for {quiet:.0f} s (limit {self.stall_seconds:.0f} s)"
        return True, ""

    def retry_after(self) -> int:
        """Seconds a refused client should wait: about the time the batches ahead of it take (one piece each)."""
        batches = max(1, self._pending // max(1, self.cloner.max_batch))
        return max(1, min(600, round(batches * (self.step_seconds or 1.0))))

    def submit(self, request: CloneRequest) -> Ticket:
        """Queue `request` (already checked); raises QueueFull when `max_pending` are waiting or running."""
        if not self.alive:
            raise Unavailable(self.health()[1] or "the server is shutting down")
        with self._lock:
            if self._pending >= self.max_pending:
                raise QueueFull(f"{self._pending} requests are pending (limit {self.max_pending}); retry later")
            self._pending += 1
        ticket = Ticket(request, asyncio.get_running_loop())
        self._queue.put(ticket)
        return ticket

    def close(self, timeout: float = 30.0) -> None:
        """Stop after the batch running now; requests not finished get `Unavailable`."""
        self._closing.set()
        self._queue.put(None)
        self._thread.join(timeout=timeout)

    # --------------------------------------------------------------------------------------------- worker

    def _collect(self) -> bool:
        """Move arrived requests into the active list (blocking while there is nothing to do); False: close."""
        try:
            first = self._queue.get(timeout=None if not self._active else 0)
        except queue.Empty:
            return True
        if first is None:
            return False
        arrived = [first]
        deadline = time.perf_counter() + (self.wait_seconds if not self._active else 0)
        while len(arrived) + len(self._active) < self.cloner.max_batch or not self._queue.empty():
            try:
                ticket = self._queue.get(timeout=max(0.0, deadline - time.perf_counter()))
            except queue.Empty:
                break
            if ticket is None:
                self._start(arrived)
                return False
            arrived.append(ticket)
        self._start(arrived)
        return True

    def _start(self, tickets: list[Ticket]) -> None:
        for ticket in tickets:
            try:
                ticket.job = self.cloner.start(ticket.request, ticket.submitted)
            except Exception as err:  # noqa: BLE001 - any failure of one request is reported to it alone
                self._finish(ticket, err if isinstance(err, InferenceError) else BatchFailed(_describe(err)))
                continue
            self._active.append(ticket)

    def _next_batch(self) -> list[Ticket]:
        """Up to `max_batch` active requests of the adapter of the one served longest ago, oldest first."""
        for ticket in [t for t in self._active if t.cancelled]:
            self._active.remove(ticket)
            self._finish(ticket, Unavailable("the client went away"))
        if not self._active:
            return []
        adapter = self._active[0].request.adapter
        batch = [t for t in self._active if t.request.adapter == adapter][: self.cloner.max_batch]
        for ticket in batch:  # served now: to the back of the line
            self._active.remove(ticket)
            self._active.append(ticket)
        return batch

    def _work(self) -> None:
        try:
            while not self._closing.is_set() and self._collect():
                batch = self._next_batch()
                if batch:
                    self._run(batch)
        except BaseException as err:  # the loop itself broke: say why, and fail what waits
            self.died = _describe(err)
            log.error(f"the batch worker stopped: {self.died}")
        finally:
            self._closing.set()
            self._fail_all(Unavailable(f"the server is shutting down{': ' + self.died if self.died else ''}"))

    def _run(self, tickets: list[Ticket]) -> None:
        self.batches_run += 1
        self.largest_batch = max(self.largest_batch, len(tickets))
        self._busy, self._beat = True, time.monotonic()
        started = time.monotonic()
        try:
            for chunk in self.cloner.step([t.job for t in tickets], stream=True):
                self._beat = time.monotonic()
                ticket = tickets[chunk.index]
                if chunk.result is not None:
                    self._active.remove(ticket)
                    self._finish(ticket, chunk.result)
                elif len(chunk.samples):
                    self._send(ticket, chunk.samples)
        except Exception as err:  # noqa: BLE001 - whatever one batch raises fails that batch only
            self.failed_batches += 1
            log.exception(f"a batch of {len(tickets)} request(s) failed")
            failure = err if isinstance(err, InferenceError) else BatchFailed(_describe(err))
            for ticket in tickets:
                if ticket in self._active:
                    self._active.remove(ticket)
                    self._finish(ticket, failure)
        finally:
            self._busy = False
            took = time.monotonic() - started
            self.step_seconds = took if not self.step_seconds else 0.8 * self.step_seconds + 0.2 * took

    def _fail_all(self, err: Exception) -> None:
        for ticket in self._active:
            self._finish(ticket, err)
        self._active.clear()
        while True:
            try:
                ticket = self._queue.get_nowait()
            except queue.Empty:
                return
            if ticket is not None:
                self._finish(ticket, err)

    def _finish(self, ticket: Ticket, item) -> None:
        with self._lock:
            self._pending -= 1
        self._send(ticket, item)

    @staticmethod
    def _send(ticket: Ticket, item) -> None:
        try:
            ticket.loop.call_soon_threadsafe(ticket.chunks.put_nowait, item)
        except RuntimeError:  # the event loop is closed: nobody waits for it any more
            pass


def _describe(err: BaseException) -> str:
    return f"internal error while generating: {type(err).__name__}: {err}"
