"""Pool core: properties that hold whatever order deaths, timeouts, cancels and results come in.

A simulated driver keeps fake workers that follow the driver contract (tasks run in the
order sent, every SpawnWorker ends in one WorkerExited...) and lets hypothesis choose what
happens next: submits, input, readiness, results, errors, deaths, ticks, cancels, Ctrl-C,
close, terminate. After every step it checks the core's invariants and its own; at the end
it lets every worker behave, closes the pool and checks that every job was resolved exactly
once, with the right values, and that the pool stopped.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from manyproc._poolcore import (
    CancelAll,
    CancelJob,
    CancelMode,
    Close,
    Consumed,
    DeliverResults,
    Event,
    FeedInput,
    InputFailed,
    Instruction,
    JobKind,
    JobProgress,
    JobSpec,
    KillWorker,
    Outcome,
    PoolConfig,
    PoolCore,
    PoolState,
    PoolStopped,
    RequestInput,
    ResolveJob,
    RetireWorker,
    RevokeTask,
    SendFailed,
    SendTask,
    SpawnWorker,
    StopWorker,
    SubmitJob,
    TaskDone,
    TaskProgress,
    TaskSkipped,
    TaskStarted,
    Terminate,
    Tick,
    WorkerExited,
    WorkerInitFailed,
    WorkerReady,
    WorkerStarted,
)


def compute(x: int) -> int:
    return x * 10


def is_bad(x: int) -> bool:
    return x % 5 == 4


class ItemError(Exception):
    pass


@dataclass
class FakeWorker:
    wid: int
    stage: str = "spawned"  # spawned, starting, ready
    line: deque[SendTask] = field(default_factory=deque)
    revoked: set[int] = field(default_factory=set)
    doomed: bool = False  # told to stop or be killed, or its initializer failed
    stopped: bool = False
    sends: int = 0


@dataclass
class FakeJob:
    job_id: int
    spec: JobSpec
    items: list[int]
    lazy: bool
    cursor: int  # items given to the core so far
    requested: int = 0
    ended: bool = False
    input_error_at: int | None = None
    resolutions: list[ResolveJob] = field(default_factory=list)
    deliveries: list[DeliverResults] = field(default_factory=list)
    unacked: int = 0
    out: set[int] = field(default_factory=set)  # its tasks held by some fake worker


class Sim:
    def __init__(self, config: PoolConfig) -> None:
        self.config = config
        self.core = PoolCore(config)
        self.now = 0.0
        self.workers: dict[int, FakeWorker] = {}
        self.ever_spawned: set[int] = set()
        self.jobs: dict[int, FakeJob] = {}
        self.stopped = 0
        self.next_job = 1

    # --- talking to the core ---------------------------------------------------------

    def do(self, *events: Event) -> None:
        out = self.core.handle(*events)
        self.core.check_invariants()
        for instr in out:
            self.carry_out(instr)
        self.check()

    def carry_out(self, i: Instruction) -> None:
        if isinstance(i, SpawnWorker):
            assert i.worker_id not in self.ever_spawned
            self.ever_spawned.add(i.worker_id)
            self.workers[i.worker_id] = FakeWorker(i.worker_id)
        elif isinstance(i, SendTask):
            w = self.workers[i.worker_id]  # KeyError: sent to an exited worker
            assert w.stage == "ready" and not w.doomed, (w, i)
            w.line.append(i)
            w.sends += 1
            assert len(w.line) <= 1 + self.config.prefetch
            if self.config.maxtasksperchild is not None:
                assert w.sends <= self.config.maxtasksperchild
            job = self.jobs[i.job_id]
            if job.spec.kind is not JobKind.MAP:  # a failed map keeps running its tasks
                assert not job.resolutions, "work sent for a job already resolved"
            job.out.add(i.task_id)
            assert list(i.items) == job.items[i.start:i.start + len(i.items)]
        elif isinstance(i, RevokeTask):
            w = self.workers[i.worker_id]
            assert any(s.task_id == i.task_id for s in w.line)
            w.revoked.add(i.task_id)
        elif isinstance(i, StopWorker):
            w = self.workers[i.worker_id]
            assert not w.line, "stopped a worker that holds tasks"
            w.doomed = w.stopped = True
        elif isinstance(i, KillWorker):
            w = self.workers[i.worker_id]
            w.doomed = True
            for send in w.line:  # the core resolved or handed back all of them
                self.jobs[send.job_id].out.discard(send.task_id)
        elif isinstance(i, RequestInput):
            job = self.jobs[i.job_id]
            assert job.lazy and not job.ended and i.count > 0
            job.requested += i.count
        elif isinstance(i, DeliverResults):
            job = self.jobs[i.job_id]
            assert job.spec.kind.streams and not job.resolutions
            job.deliveries.append(i)
            job.unacked += 1
        elif isinstance(i, ResolveJob):
            job = self.jobs[i.job_id]
            job.resolutions.append(i)
            assert len(job.resolutions) == 1, f"job {i.job_id} resolved twice"
        elif isinstance(i, PoolStopped):
            self.stopped += 1
            assert self.stopped == 1 and not self.workers
        else:
            assert isinstance(i, JobProgress)

    def check(self) -> None:
        for job in self.jobs.values():
            window = job.spec.max_in_flight
            if window is not None and not job.resolutions:
                assert len(job.out) <= window

    # --- what the world can do ---------------------------------------------------------

    def submit(self, kind: JobKind, items: list[int], lazy: bool, spec_kw: dict) -> None:
        if kind is JobKind.APPLY:
            items, lazy, spec_kw = items[:1] or [0], False, {
                k: v for k, v in spec_kw.items() if k == "task_timeout"}
        spec = JobSpec(kind=kind, **spec_kw)
        job = FakeJob(self.next_job, spec, items, lazy, cursor=0 if lazy else len(items))
        self.next_job += 1
        self.jobs[job.job_id] = job
        job.ended = not lazy
        accepted = self.core.accepting
        self.do(SubmitJob(now=self.now, job_id=job.job_id, spec=spec,
                          items=[] if lazy else list(items), exhausted=not lazy))
        if not accepted:
            assert job.resolutions and job.resolutions[0].outcome is Outcome.ERROR

    def feed(self, job: FakeJob, count: int, end: bool, fail: bool) -> None:
        count = min(count, job.requested, len(job.items) - job.cursor)
        chunk = job.items[job.cursor:job.cursor + count]
        job.cursor += count
        job.requested = 0  # every FeedInput settles the requests so far
        if fail:
            job.ended = True
            job.input_error_at = job.cursor
            self.do(FeedInput(now=self.now, job_id=job.job_id, items=chunk),
                    InputFailed(now=self.now, job_id=job.job_id, error=OSError("input")))
            return
        end = end or job.cursor == len(job.items)
        job.ended = end
        self.do(FeedInput(now=self.now, job_id=job.job_id, items=chunk, exhausted=end))

    def answer(self, w: FakeWorker, how: int) -> None:
        """The worker ends the task at the head of its line."""
        send = w.line.popleft()
        job = self.jobs[send.job_id]
        job.out.discard(send.task_id)
        if send.task_id in w.revoked and how % 2 == 0:
            self.do(TaskSkipped(now=self.now, worker_id=w.wid, task_id=send.task_id))
            return
        results: list[int] = []
        for x in send.items:
            if is_bad(x):
                self.do(TaskDone(now=self.now, worker_id=w.wid, task_id=send.task_id,
                                 results=results, error=ItemError(x)))
                return
            results.append(compute(x))
        self.do(TaskDone(now=self.now, worker_id=w.wid, task_id=send.task_id, results=results,
                         duration=0.001 * len(results) if how % 3 else None))

    def exit(self, w: FakeWorker, exitcode: int | None) -> None:
        del self.workers[w.wid]
        for send in w.line:
            self.jobs[send.job_id].out.discard(send.task_id)
        self.do(WorkerExited(now=self.now, worker_id=w.wid, exitcode=exitcode))

    def send_failed(self, w: FakeWorker, index: int) -> None:
        send = w.line[index]
        del w.line[index]
        w.sends -= 1  # it never reached the worker
        self.jobs[send.job_id].out.discard(send.task_id)
        self.do(SendFailed(now=self.now, worker_id=w.wid, task_id=send.task_id,
                           error=TypeError("cannot pickle")))

    # --- the final act: everyone behaves -------------------------------------------------

    def drain(self) -> None:
        closed = False
        for _ in range(5000):
            if self.stopped:
                return
            progressed = False
            for w in list(self.workers.values()):
                if w.doomed and not w.line or w.doomed and w.stage != "ready":
                    self.exit(w, -9 if not w.stopped else 0)
                    progressed = True
                elif w.stage == "spawned":
                    w.stage = "starting"
                    self.do(WorkerStarted(now=self.now, worker_id=w.wid, pid=w.wid))
                    progressed = True
                elif w.stage == "starting":
                    w.stage = "ready"
                    self.do(WorkerReady(now=self.now, worker_id=w.wid))
                    progressed = True
                elif w.line:
                    self.answer(w, 0)
                    progressed = True
            for job in list(self.jobs.values()):
                if job.lazy and not job.ended and not job.resolutions and job.requested:
                    self.feed(job, job.requested, end=False, fail=False)
                    progressed = True
                elif job.lazy and not job.ended and not job.resolutions:
                    job.ended = True
                    self.do(FeedInput(now=self.now, job_id=job.job_id, exhausted=True))
                    progressed = True
                if job.spec.ack_consumption and job.unacked:
                    count, job.unacked = job.unacked, 0
                    self.do(Consumed(now=self.now, job_id=job.job_id, count=count))
                    progressed = True
            if not progressed:
                if closed:
                    self.now += 100.0  # let stop timeouts fire
                    self.do(Tick(now=self.now))
                else:
                    closed = True
                    self.do(Close(now=self.now))
        raise AssertionError("the pool did not stop")

    def final_checks(self) -> None:
        assert self.stopped == 1 and not self.workers
        for job in self.jobs.values():
            assert len(job.resolutions) == 1, f"job {job.job_id} never resolved"
            resolution = job.resolutions[0]
            kind = job.spec.kind
            fed = job.items[:job.cursor]
            if resolution.outcome is Outcome.OK:
                if kind is JobKind.APPLY:
                    assert resolution.value == compute(job.items[0])
                elif kind is JobKind.MAP:
                    assert resolution.value == [compute(x) for x in fed]
                    assert not any(is_bad(x) for x in fed)
                else:
                    self.check_stream(job, fed)
            elif resolution.outcome is Outcome.ERROR:
                assert resolution.error is not None and resolution.value is None
            else:
                assert resolution.error is None

    def check_stream(self, job: FakeJob, fed: list[int]) -> None:
        covered: list[tuple[int, int]] = []
        for d in job.deliveries:
            for offset, value in enumerate(d.values):
                assert value == compute(fed[d.start + offset])
            if d.error is not None and isinstance(d.error, ItemError):
                assert d.error.args[0] == fed[d.start + len(d.values)]
            covered.append((d.start, d.stop))
        total = len(fed) + (1 if job.input_error_at is not None else 0)
        if job.spec.kind is JobKind.IMAP:
            assert [start for start, _ in covered] == sorted(start for start, _ in covered)
        covered.sort()
        position = 0
        for start, stop in covered:
            assert start == position, (covered, total)
            position = stop
        assert position == total


configs = st.builds(
    PoolConfig,
    processes=st.integers(1, 3),
    prefetch=st.integers(0, 2),
    maxtasksperchild=st.none() | st.integers(1, 3),
    lost_task_retries=st.integers(0, 1),
    max_start_failures=st.integers(1, 4),
    eager_spawn=st.booleans(),
    start_timeout=st.none() | st.just(5.0),
    stop_timeout=st.none() | st.just(3.0),
    story_length=st.just(200),
)

spec_kws = st.fixed_dictionaries({}, optional={
    "chunksize": st.none() | st.integers(1, 4),
    "task_timeout": st.sampled_from([1.0, 2.5]),
    "max_in_flight": st.integers(1, 4),
    "progress": st.booleans(),
    "cancel_on_error": st.booleans(),
})


ACTIONS = [
    "submit", "submit", "submit", "feed", "feed", "start", "start", "start",
    "answer", "answer", "answer", "answer", "die", "tick", "tick", "cancel", "cancel",
    "consume", "progress", "send_failed", "init_failed", "retire", "rare",
]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(config=configs, data=st.data())
def test_every_job_resolves_exactly_once_whatever_happens(config: PoolConfig, data) -> None:
    sim = Sim(config)
    sim.do(Tick(now=0.0))
    from manyproc._poolcore import Start
    sim.do(Start(now=0.0))
    steps = data.draw(st.integers(5, 60), label="steps")
    for _ in range(steps):
        action = data.draw(st.sampled_from(ACTIONS), label="action")
        workers = list(sim.workers.values())
        if action == "submit":
            kind = data.draw(st.sampled_from(list(JobKind)), label="kind")
            items = data.draw(st.lists(st.integers(0, 30), max_size=10), label="items")
            lazy = data.draw(st.booleans(), label="lazy")
            spec_kw = data.draw(spec_kws, label="spec")
            if kind.streams and data.draw(st.booleans(), label="ack"):
                spec_kw["ack_consumption"] = True
            sim.submit(kind, items, lazy, spec_kw)
        elif action == "feed":
            lazy = [j for j in sim.jobs.values() if j.lazy and not j.ended and j.requested]
            if lazy:
                job = data.draw(st.sampled_from(lazy), label="job")
                sim.feed(job, data.draw(st.integers(0, 5)), data.draw(st.booleans()),
                         fail=data.draw(st.integers(0, 9)) == 0)
        elif action == "start":
            fresh = [w for w in workers if w.stage != "ready" and not w.doomed]
            if fresh:
                w = data.draw(st.sampled_from(fresh), label="worker")
                was_starting = w.stage == "starting"
                if w.stage == "spawned":
                    w.stage = "starting"
                    sim.do(WorkerStarted(now=sim.now, worker_id=w.wid, pid=w.wid))
                if was_starting or data.draw(st.integers(0, 3), label="and ready") > 0:
                    w.stage = "ready"
                    sim.do(WorkerReady(now=sim.now, worker_id=w.wid))
        elif action == "init_failed":
            fresh = [w for w in workers if w.stage != "ready" and not w.doomed]
            if fresh:
                w = data.draw(st.sampled_from(fresh), label="worker")
                w.doomed = True
                sim.do(WorkerInitFailed(now=sim.now, worker_id=w.wid,
                                        error=RuntimeError("init")))
        elif action == "answer":
            busy = [w for w in workers if w.line]
            if busy:
                w = data.draw(st.sampled_from(busy), label="worker")
                sim.answer(w, data.draw(st.integers(0, 5)))
        elif action == "progress":
            busy = [w for w in workers if w.line and not w.doomed]
            if busy:
                w = data.draw(st.sampled_from(busy), label="worker")
                head = w.line[0]
                if data.draw(st.booleans()):
                    sim.do(TaskStarted(now=sim.now, worker_id=w.wid, task_id=head.task_id))
                else:
                    sim.do(TaskProgress(now=sim.now, worker_id=w.wid, task_id=head.task_id,
                                        items_done=data.draw(st.integers(0, len(head.items)))))
        elif action == "send_failed":
            busy = [w for w in workers if w.line and not w.doomed]
            if busy:
                w = data.draw(st.sampled_from(busy), label="worker")
                sim.send_failed(w, data.draw(st.integers(0, len(w.line) - 1)))
        elif action == "retire":
            if workers:
                w = data.draw(st.sampled_from(workers), label="worker")
                sim.do(RetireWorker(now=sim.now, worker_id=w.wid))
        elif action == "die":
            if workers:
                w = data.draw(st.sampled_from(workers), label="worker")
                sim.exit(w, data.draw(st.sampled_from([-9, -11, 0, 1, None])))
        elif action == "tick":
            sim.now += data.draw(st.sampled_from([0.0, 0.5, 1.0, 3.0, 10.0]), label="dt")
            sim.do(Tick(now=sim.now))
        elif action == "cancel":
            if sim.jobs:
                job_id = data.draw(st.sampled_from(sorted(sim.jobs)), label="job")
                mode = data.draw(st.sampled_from(list(CancelMode)), label="mode")
                sim.do(CancelJob(now=sim.now, job_id=job_id, mode=mode))
        elif action == "consume":
            acked = [j for j in sim.jobs.values() if j.unacked]
            if acked:
                job = data.draw(st.sampled_from(acked), label="job")
                count = data.draw(st.integers(1, job.unacked))
                job.unacked -= count
                sim.do(Consumed(now=sim.now, job_id=job.job_id, count=count))
        elif action == "rare":
            which = data.draw(st.sampled_from(["cancel_all", "close", "terminate", "none"]))
            if which == "cancel_all":
                sim.do(CancelAll(now=sim.now, error=KeyboardInterrupt()))
            elif which == "close":
                sim.do(Close(now=sim.now, cancel_pending=data.draw(st.booleans())))
            elif which == "terminate":
                sim.do(Terminate(now=sim.now))
    sim.drain()
    sim.final_checks()
    assert sim.core.state in (PoolState.CLOSED, PoolState.TERMINATED, PoolState.BROKEN)
    stats = sim.core.statistics()
    assert stats.tasks_running == 0 and stats.jobs_pending == 0


@settings(max_examples=100, deadline=None)
@given(n=st.integers(0, 60), processes=st.integers(1, 4), chunksize=st.none() | st.integers(1, 7),
       order=st.randoms(use_true_random=False), kind=st.sampled_from([JobKind.MAP, JobKind.IMAP,
                                                                       JobKind.IMAP_UNORDERED]))
def test_results_come_back_complete_and_in_order_whatever_the_completion_order(
        n, processes, chunksize, order, kind) -> None:
    core = PoolCore(PoolConfig(processes=processes))
    from manyproc._poolcore import Start
    out = core.handle(Start(now=0))
    ready = [WorkerReady(now=0, worker_id=i.worker_id) for i in out]
    out = core.handle(*ready, SubmitJob(now=0, job_id=1, spec=JobSpec(kind=kind,
                                                                      chunksize=chunksize),
                                        items=list(range(n))))
    running = [i for i in out if isinstance(i, SendTask)]
    collected: list[Instruction] = list(out)
    while running:
        send = running.pop(order.randrange(len(running)))
        out = core.handle(TaskDone(now=0, worker_id=send.worker_id, task_id=send.task_id,
                                   results=[x * 2 for x in send.items]))
        collected += out
        running += [i for i in out if isinstance(i, SendTask)]
    (resolve,) = [i for i in collected if isinstance(i, ResolveJob)]
    if kind is JobKind.MAP:
        assert resolve.value == [x * 2 for x in range(n)]
    else:
        values = [(d.start, v) for d in collected if isinstance(d, DeliverResults)
                  for v in d.values]
        if kind is JobKind.IMAP:
            assert [v for _, v in values] == [x * 2 for x in range(n)]
        else:
            assert sorted(v for _, v in values) == [x * 2 for x in range(n)]
