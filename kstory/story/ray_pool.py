"""A pool of story workers on Ray that hands out units of work and re-queues the unit of a worker that dies.

Each unit goes to one idle worker at a time; a worker that dies (its process,
its node, or ``ray.kill``) is named in the log with its node, dropped from
the pool, and its unit goes back to the front of the queue for the others.
Results are handed over exactly once per unit, so nothing is lost and
nothing is written twice.
"""

from __future__ import annotations

import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from kstory.core.errors import KstoryError
from kstory.core.logs import get_logger
from kstory.story.ray_worker import StoryWorker

log = get_logger("story")


@dataclass
class Worker:
    name: str
    actor: Any
    where: dict[str, Any]

    def describe(self) -> str:
        where = self.where
        return f"{self.name} (host {where.get('host', '?')}, node {str(where.get('node', '?'))[:12]}, pid {where.get('pid', '?')})"


class StoryPool:
    """``count`` workers, each with one GPU (``gpus=1``) or ``cpus`` CPUs, each loading its own Session."""

    def __init__(self, load_session: Callable[[], Any], count: int, *, gpus: float, cpus: float, threads: int):
        import ray

        self.ray = ray
        token = uuid.uuid4().hex[:8]
        remote = ray.remote(max_restarts=0, max_task_retries=0)(StoryWorker)
        actors = [(f"kstory-story-{token}-{i}",
                   remote.options(name=f"kstory-story-{token}-{i}", num_gpus=gpus, num_cpus=cpus)
                   .remote(load_session, threads)) for i in range(count)]
        self.workers: list[Worker] = []
        for name, actor in actors:
            try:
                self.workers.append(Worker(name, actor, ray.get(actor.where.remote())))
            except ray.exceptions.RayActorError as error:
                log.error("story worker %s did not start: %s", name, _first_line(error))
        self._require_workers()
        log.info("story on Ray: %d worker(s): %s", len(self.workers), "; ".join(w.describe() for w in self.workers))

    def broadcast(self, method: str, *args: Any) -> None:
        """Call ``method`` on every worker and wait; workers that die on the way are dropped."""
        calls = {getattr(w.actor, method).remote(*args): w for w in self.workers}
        for ref, worker in calls.items():
            try:
                self._get(ref)
            except self.ray.exceptions.RayActorError as error:
                self._drop(worker, error)
        self._require_workers()

    def run(self, units: Sequence[Any], args_of: Callable[[Any], tuple[Any, ...]],
            done: Callable[[Any, Any, Worker], None]) -> None:
        """Run every unit (``worker.run(*args_of(unit))``) and call ``done(unit, result, worker)`` once per unit."""
        queue, idle, running = deque(units), list(self.workers), {}
        while queue or running:
            while queue and idle:
                worker, unit = idle.pop(0), queue.popleft()
                running[worker.actor.run.remote(*args_of(unit))] = (worker, unit)
            ready, _ = self.ray.wait(list(running), num_returns=1)
            worker, unit = running.pop(ready[0])
            try:
                result = self._get(ready[0])
            except self.ray.exceptions.RayActorError as error:
                self._drop(worker, error)
                queue.appendleft(unit)  # its work goes to the others
                self._require_workers()
                continue
            idle.append(worker)
            done(unit, result, worker)

    def close(self) -> None:
        for worker in self.workers:
            self.ray.kill(worker.actor)
        self.workers = []

    def _get(self, ref: Any) -> Any:
        try:
            return self.ray.get(ref)
        except self.ray.exceptions.RayTaskError as error:
            cause = getattr(error, "cause", None)
            if isinstance(cause, KstoryError):  # the worker's own clear error (out of memory, a missing file)
                raise KstoryError(cause.message, path=cause.path, fix=cause.fix) from None
            raise

    def _drop(self, worker: Worker, error: Exception) -> None:
        log.error("story worker %s failed: %s; its batches go to the other workers", worker.describe(),
                  _first_line(error))
        self.workers = [w for w in self.workers if w is not worker]

    def _require_workers(self) -> None:
        if not self.workers:
            raise KstoryError("every story worker on Ray failed (see the log for the nodes)",
                              fix="check the cluster's nodes (`ray status`), or run without ray: / --ray")


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]
