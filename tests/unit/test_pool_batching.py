"""Batching of chunksize=1 jobs in the pool core (JobSpec.batch_limit): tiny items travel
together once measured, but a batch never fails as a whole."""

from __future__ import annotations

import pytest

from manyproc._errors import TaskTimeoutError, WorkerLostError
from manyproc._poolcore import (
    DeliverResults,
    JobKind,
    JobSpec,
    KillWorker,
    ResolveJob,
    SendTask,
    TaskDone,
)

from .test_poolcore_harness import Harness, of

IMAP = JobKind.IMAP


def answer(h, send, seconds=1e-5):
    return h.do(TaskDone(now=h.now, worker_id=send.worker_id, task_id=send.task_id,
                         results=[x * 10 for x in send.items], duration=seconds))


def batches_after_warm_up(h, items=200, **spec):
    """Submit a batching imap and answer tasks until one with several items is sent."""
    _, out = h.submit(IMAP, list(range(items)), chunksize=1, batch_limit=8, **spec)
    pending = of(out, SendTask)
    for _ in range(100):
        send = pending.pop(0)
        if len(send.items) > 1:
            return send, pending
        pending += of(answer(h, send), SendTask)
    raise AssertionError("never batched")


def test_tiny_items_get_batched_up_to_the_limit():
    h = Harness(processes=1, prefetch=1)
    h.boot()
    send, _ = batches_after_warm_up(h)
    assert 1 < len(send.items) <= 8


def test_slow_items_are_not_batched():
    h = Harness(processes=1, prefetch=1)
    h.boot()
    _, out = h.submit(IMAP, list(range(20)), chunksize=1, batch_limit=8)
    pending = of(out, SendTask)
    for _ in range(19):
        send = pending.pop(0)
        assert len(send.items) == 1
        pending += of(answer(h, send, seconds=0.5), SendTask)


def test_a_death_in_a_batch_fails_only_the_item_at_fault():
    h = Harness(processes=1, prefetch=0)
    (wid,) = h.boot()
    send, _ = batches_after_warm_up(h)
    out = h.exit(wid)  # the batch's worker died: nothing fails yet
    assert not any(isinstance(i, DeliverResults) and i.error for i in out)
    assert h.core.statistics().tasks_lost == 0
    culprit = send.items[2]
    resolved = []
    pending = list(out)
    for _ in range(1000):
        if not pending:
            break
        i = pending.pop(0)
        if isinstance(i, SendTask):
            if culprit in i.items:
                assert i.items == (culprit,)  # handed back alone
                pending += h.exit(i.worker_id)
            else:
                pending += answer(h, i)
        elif isinstance(i, DeliverResults) and i.error is not None:
            resolved.append((i.start, i.error))
        elif isinstance(i, ResolveJob):
            break
        else:
            pending += h.ready(i.worker_id) if i.__class__.__name__ == "SpawnWorker" else []
    assert [start for start, _ in resolved] == [culprit]
    assert isinstance(resolved[0][1], WorkerLostError)


def test_a_timed_out_batch_is_split_and_only_the_slow_item_times_out():
    h = Harness(processes=1, prefetch=0)
    (wid,) = h.boot()
    send, _ = batches_after_warm_up(h, task_timeout=1.0)
    out = h.tick(1.0 + len(send.items) * 0.001 + 0.01)  # the batch's deadline: one timeout
    assert of(out, KillWorker)
    assert not any(isinstance(i, DeliverResults) and i.error for i in out)
    assert h.core.statistics().tasks_timed_out == 0
    pending = list(out)
    slow = send.items[0]
    errors = []
    for _ in range(1000):
        if not pending:
            break
        i = pending.pop(0)
        if isinstance(i, SendTask):
            if slow in i.items:
                pending += h.tick(1.01)
            else:
                pending += answer(h, i)
        elif isinstance(i, DeliverResults) and i.error is not None:
            errors.append((i.start, i.error))
        elif i.__class__.__name__ == "SpawnWorker":
            pending += h.ready(i.worker_id)
    assert [start for start, _ in errors] == [slow]
    assert isinstance(errors[0][1], TaskTimeoutError)


def test_batch_limit_validation():
    with pytest.raises(ValueError, match="batch_limit"):
        JobSpec(kind=JobKind.IMAP, chunksize=4, batch_limit=8)
    with pytest.raises(ValueError, match="batch_limit"):
        JobSpec(kind=JobKind.APPLY, batch_limit=8)
    with pytest.raises(ValueError, match="batch_limit"):
        JobSpec(kind=JobKind.IMAP, batch_limit=0)
