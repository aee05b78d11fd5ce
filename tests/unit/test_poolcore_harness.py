"""A tiny hand-driven driver for the pool core's unit tests (and a check of it).

``Harness`` wraps a ``PoolCore`` with a fake clock; every call hands events to the core,
checks the core's invariants, and returns the instructions. Tests then assert on
instructions with ``only`` / ``of``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

from manyproc._poolcore import (
    Event,
    Instruction,
    JobKind,
    JobSpec,
    PoolConfig,
    PoolCore,
    ResolveJob,
    SendTask,
    SpawnWorker,
    Start,
    SubmitJob,
    TaskDone,
    Tick,
    WorkerExited,
    WorkerReady,
    WorkerStarted,
)

InstrT = TypeVar("InstrT", bound=Instruction)


def of(out: Sequence[Instruction], kind: type[InstrT]) -> list[InstrT]:
    """The instructions of one type, in order."""
    return [i for i in out if isinstance(i, kind)]


def only(out: Sequence[Instruction], kind: type[InstrT]) -> InstrT:
    """The single instruction of one type (fails if there are none or several)."""
    found = of(out, kind)
    assert len(found) == 1, f"expected one {kind.__name__}, got {found} in {out}"
    return found[0]


class Harness:
    """A PoolCore, a fake clock and shortcuts for the events tests send most."""

    def __init__(self, **config: object) -> None:
        config.setdefault("processes", 2)
        self.core = PoolCore(PoolConfig(**config))  # type: ignore[arg-type]
        self.now = 0.0
        self.log: list[Instruction] = []
        self._job_ids = iter(range(1, 1_000_000))

    def do(self, *events: Event) -> list[Instruction]:
        out = self.core.handle(*events)
        self.log.extend(out)
        self.core.check_invariants()
        return out

    def start(self) -> list[int]:
        """Start the pool; return the ids of the workers it asked for."""
        return [s.worker_id for s in of(self.do(Start(now=self.now)), SpawnWorker)]

    def ready(self, *worker_ids: int, pid_base: int = 1000) -> list[Instruction]:
        events: list[Event] = []
        for wid in worker_ids:
            events.append(WorkerStarted(now=self.now, worker_id=wid, pid=pid_base + wid))
            events.append(WorkerReady(now=self.now, worker_id=wid))
        return self.do(*events)

    def boot(self) -> list[int]:
        """Start the pool and make every worker ready; return the worker ids."""
        ids = self.start()
        self.ready(*ids)
        return ids

    def submit(self, kind: JobKind, items: Sequence[object], *, exhausted: bool = True,
               **spec: object) -> tuple[int, list[Instruction]]:
        job_id = next(self._job_ids)
        job_spec = JobSpec(kind=kind, **spec)  # type: ignore[arg-type]
        out = self.do(SubmitJob(now=self.now, job_id=job_id, spec=job_spec, items=items,
                                exhausted=exhausted))
        return job_id, out

    def finish(self, send: SendTask, results: Sequence[object] | None = None,
               error: BaseException | None = None, **kw: object) -> list[Instruction]:
        """Answer a SendTask: by default each item's result is ``(item, 'r')``."""
        if results is None:
            results = [] if error is not None else [(x, "r") for x in send.items]
        return self.do(TaskDone(now=self.now, worker_id=send.worker_id, task_id=send.task_id,
                                results=results, error=error, **kw))  # type: ignore[arg-type]

    def exit(self, worker_id: int, exitcode: int | None = -9) -> list[Instruction]:
        return self.do(WorkerExited(now=self.now, worker_id=worker_id, exitcode=exitcode))

    def tick(self, dt: float = 0.0) -> list[Instruction]:
        self.now += dt
        return self.do(Tick(now=self.now))

    def run_to_end(self, out: Sequence[Instruction], fn=lambda x: (x, "r"),
                   limit: int = 10_000) -> list[Instruction]:
        """Answer every SendTask (and readiness of new workers) until nothing is pending."""
        pending = list(out)
        everything: list[Instruction] = list(out)
        for _ in range(limit):
            step: list[Instruction] = []
            for i in pending:
                if isinstance(i, SendTask):
                    step += self.finish(i, [fn(x) for x in i.items])
                elif isinstance(i, SpawnWorker):
                    step += self.ready(i.worker_id)
            if not step:
                return everything
            everything += step
            pending = step
        raise AssertionError("run_to_end did not settle")


def test_harness_runs_one_apply() -> None:
    h = Harness(processes=1)
    h.boot()
    job, out = h.submit(JobKind.APPLY, ["x"])
    done = h.run_to_end(out)
    resolve = only(done, ResolveJob)
    assert (resolve.job_id, resolve.value) == (job, ("x", "r"))
