"""A queue that batches concurrent requests for one `VoiceCloner`, run by a single worker thread.

The model runs one batch at a time. Requests that arrive while it is busy, or within `wait_seconds` of each other,
are generated together (up to the cloner's `max_batch`, one adapter per batch), which is where a GPU gets its
throughput. Each request gets its audio back chunk by chunk on its own asyncio queue, so the REST endpoint (which
waits for the last chunk) and the WebSocket stream (which forwards every chunk) share one path.

`submit` refuses a request with `QueueFull` when `max_pending` requests are already queued or running: the server
answers 429 rather than letting latency grow without bound.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from dataclasses import dataclass, field

from higgs_lora.infer.cloner import CloneRequest, InferenceError, VoiceCloner


class QueueFull(RuntimeError):
    """Too many requests pending; try again later."""


@dataclass
class Ticket:
    """A submitted request and where its chunks go."""

    request: CloneRequest
    loop: asyncio.AbstractEventLoop
    chunks: asyncio.Queue = field(default_factory=asyncio.Queue)
    """Receives numpy chunks, then the CloneResult, or an Exception."""
    submitted: float = field(default_factory=time.perf_counter)


class BatchQueue:
    """Collects requests and runs them in batches on one worker thread."""

    def __init__(self, cloner: VoiceCloner, max_pending: int = 32, wait_seconds: float = 0.02):
        self.cloner, self.max_pending, self.wait_seconds = cloner, max_pending, wait_seconds
        self._queue: queue.Queue[Ticket | None] = queue.Queue()
        self._pending = 0
        self._lock = threading.Lock()
        self.batches_run = 0
        self.largest_batch = 0
        self._thread = threading.Thread(target=self._work, name="higgs-lora-batches", daemon=True)
        self._thread.start()

    @property
    def pending(self) -> int:
        return self._pending

    def submit(self, request: CloneRequest) -> Ticket:
        """Queue `request` (already checked); raises QueueFull when `max_pending` are waiting or running."""
        with self._lock:
            if self._pending >= self.max_pending:
                raise QueueFull(f"{self._pending} requests are pending (limit {self.max_pending}); retry later")
            self._pending += 1
        ticket = Ticket(request, asyncio.get_running_loop())
        self._queue.put(ticket)
        return ticket

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)

    def _collect(self) -> list[Ticket] | None:
        first = self._queue.get()
        if first is None:
            return None
        tickets = [first]
        deadline = time.perf_counter() + self.wait_seconds
        while len(tickets) < self.cloner.max_batch:
            try:
                ticket = self._queue.get(timeout=max(0.0, deadline - time.perf_counter()))
            except queue.Empty:
                break
            if ticket is None:
                self._queue.put(None)
                break
            tickets.append(ticket)
        return tickets

    def _work(self) -> None:
        while (tickets := self._collect()) is not None:
            for group in self.cloner.batches(range(len(tickets)), [t.request.adapter for t in tickets]):
                self._run([tickets[i] for i in group])

    def _run(self, tickets: list[Ticket]) -> None:
        self.batches_run += 1
        self.largest_batch = max(self.largest_batch, len(tickets))
        finished = set()
        try:
            for chunk in self.cloner.events([t.request for t in tickets], stream=True):
                ticket = tickets[chunk.index]
                if chunk.result is not None:
                    self._send(ticket, chunk.result)
                    finished.add(chunk.index)
                elif len(chunk.samples):
                    self._send(ticket, chunk.samples)
        except (InferenceError, RuntimeError, ValueError) as err:  # reported to every unfinished request
            for index, ticket in enumerate(tickets):
                if index not in finished:
                    self._send(ticket, err)
        finally:
            with self._lock:
                self._pending -= len(tickets)

    @staticmethod
    def _send(ticket: Ticket, item) -> None:
        ticket.loop.call_soon_threadsafe(ticket.chunks.put_nowait, item)
