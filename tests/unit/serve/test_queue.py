"""The batch queue with a scripted cloner: pieces of different requests interleave round-robin, a failing batch
fails its own requests only, a dead worker shows in `health()`, a full queue names a Retry-After."""

import asyncio
import threading
from dataclasses import dataclass, field

import numpy as np
import pytest

from higgs_lora.infer.requests import Chunk, CloneRequest, InferenceError
from higgs_lora.serve.batch_queue import BatchFailed, BatchQueue, QueueFull, Unavailable


@dataclass
class Job:
    request: CloneRequest
    pieces: int
    piece: int = 0

    @property
    def done(self) -> bool:
        return self.piece >= self.pieces


@dataclass
class ScriptedCloner:
    """A cloner whose requests are `target_text` = "name:pieces"; each step records which names it ran, and raises
    `fail[n]` at step n."""

    max_batch: int = 1
    steps: list[list[str]] = field(default_factory=list)
    fail: dict = field(default_factory=dict)
    gate: threading.Event = field(default_factory=threading.Event)

    def start(self, request, started=None):
        name, pieces = request.target_text.split(":")
        if name == "bad":
            raise InferenceError("bad request")
        return Job(request, int(pieces))

    def step(self, jobs, stream=True):
        self.gate.wait()
        self.steps.append([j.request.target_text.split(":")[0] for j in jobs])
        if len(self.steps) - 1 in self.fail:
            raise self.fail[len(self.steps) - 1]
        for i, job in enumerate(jobs):
            yield Chunk(i, np.full(3, job.piece, dtype=np.float32))
            job.piece += 1
            if job.done:
                yield Chunk(i, np.zeros(0, dtype=np.float32), result=f"{job.request.target_text} done")


def request(text: str) -> CloneRequest:
    return CloneRequest(np.zeros(10, dtype=np.float32), 24000, "ref", text)


async def outcome(ticket):
    """(chunks received, the final item: a result string or the exception)."""
    chunks = 0
    while True:
        item = await ticket.chunks.get()
        if isinstance(item, np.ndarray):
            chunks += 1
        else:
            return chunks, item


def run_queue(cloner, texts, max_pending=16, after=None):
    async def main():
        queue = BatchQueue(cloner, max_pending=max_pending, wait_seconds=0)
        tickets = [queue.submit(request(t)) for t in texts]  # all queued before the worker may run a step
        extra = after(queue) if after else None
        cloner.gate.set()
        results = [await outcome(t) for t in tickets]
        health = queue.health()
        queue.close()
        return results, queue, health, extra

    return asyncio.run(main())


def test_pieces_of_different_requests_interleave_round_robin():
    cloner = ScriptedCloner(max_batch=1)
    results, queue, health, _ = run_queue(cloner, ["long:4", "a:1", "b:1"])
    # Old behaviour: long, long, long, long, a, b. A short request waits one piece, not the whole long text.
    assert cloner.steps == [["long"], ["a"], ["b"], ["long"], ["long"], ["long"]]
    assert results == [(4, "long:4 done"), (1, "a:1 done"), (1, "b:1 done")]
    assert queue.pending == 0 and health == (True, "")


def test_requests_arriving_later_join_the_next_piece_of_a_running_one():
    cloner = ScriptedCloner(max_batch=4)
    results, _, _, _ = run_queue(cloner, ["long:3", "a:1"])
    assert cloner.steps == [["long", "a"], ["long"], ["long"]]
    assert [r[1] for r in results] == ["long:3 done", "a:1 done"]


@pytest.mark.parametrize("error", [TypeError("'NoneType' object is not subscriptable"), KeyError("x"), MemoryError()])
def test_any_exception_fails_its_batch_only_and_the_worker_goes_on(error):
    cloner = ScriptedCloner(max_batch=2, fail={0: error})
    results, queue, health, _ = run_queue(cloner, ["x:1", "y:1", "z:2", "bad:1"])
    assert [type(r[1]) for r in results[:2]] == [BatchFailed, BatchFailed]
    assert type(error).__name__ in str(results[0][1])
    assert results[2] == (2, "z:2 done")  # the next batch ran
    assert isinstance(results[3][1], InferenceError) and "bad request" in str(results[3][1])
    assert health == (True, "") and queue.failed_batches == 1 and queue.pending == 0


def test_a_dead_worker_fails_health_and_what_waits():
    class Dying(BatchQueue):
        def _next_batch(self):
            raise SystemError("the loop itself broke")

    async def main():
        cloner = ScriptedCloner()
        queue = Dying(cloner, wait_seconds=0)
        ticket = queue.submit(request("a:1"))
        cloner.gate.set()
        result = await outcome(ticket)
        queue._thread.join(5)
        with pytest.raises(Unavailable, match="the loop itself broke"):
            queue.submit(request("b:1"))
        return result, queue.health(), queue.alive

    result, health, alive = asyncio.run(main())
    assert isinstance(result[1], Unavailable) and "the loop itself broke" in str(result[1])
    assert health[0] is False and "SystemError" in health[1] and alive is False


def test_a_stuck_worker_fails_health():
    async def main():
        cloner = ScriptedCloner()
        queue = BatchQueue(cloner, wait_seconds=0, stall_seconds=0.0)
        ticket = queue.submit(request("a:1"))
        while not queue._busy:  # the worker is inside a step that waits for the gate
            await asyncio.sleep(0.01)
        health = queue.health()
        cloner.gate.set()
        await outcome(ticket)
        # The ticket is answered from inside the step; the worker leaves it (and stops being busy) just after.
        for _ in range(500):
            if not queue._busy:
                break
            await asyncio.sleep(0.01)
        after = queue.health()
        queue.close()
        return health, after

    health, after = asyncio.run(main())
    assert health[0] is False and "no progress" in health[1]
    assert after == (True, "")


def test_a_full_queue_refuses_with_a_retry_after():
    def overflow(queue):
        with pytest.raises(QueueFull, match="limit 2"):
            queue.submit(request("c:1"))
        return queue.retry_after()

    cloner = ScriptedCloner(max_batch=1)
    results, _, _, retry_after = run_queue(cloner, ["a:1", "b:1"], max_pending=2, after=overflow)
    assert retry_after >= 1 and [r[1] for r in results] == ["a:1 done", "b:1 done"]
