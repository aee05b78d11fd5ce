"""The pool core: the scheduling logic of every manyproc pool, with no I/O in it.

Theory of operation
===================

``PoolCore`` is a state machine. Its driver (a backend: local processes, threads, Dask)
tells it what happened as *events* and carries out the *instructions* it answers with::

    instructions = core.handle(*events)

The core starts no process, reads no clock, touches no socket and never pickles: time
arrives as ``now`` on every event, values (items, results, exceptions) are opaque, and a
"worker" is only an id that the driver maps to a process, a thread or a cluster slot. So
one piece of logic serves every backend and can be tested without any of them::

        user threads                 driver (a backend)                 workers
    +----------------------+    +-------------------------------+   one private channel each
    | Pool, executor,      |    |                               |   +----------------+
    | asyncio faces        |    |     core.handle(*events)      |   |    worker 1    |
    |                      |    |        |             ^        |   |                |
    | SubmitJob, CancelJob +--->+        v             |        +-->+ SendTask: runs |
    | Close, Terminate,    |    |   instructions     events     |   | its tasks in   |
    | FeedInput, Consumed  |    |   carried out      gathered   +<--+ order, answers |
    |                      |    |                               |   | each: TaskDone |
    | AsyncResult, Future, +<---+ ResolveJob, DeliverResults,   |   +----------------+
    | imap iterator,       |    | JobProgress, RequestInput     |          ...
    | progress bar         |    |                               |   +----------------+
    +----------------------+    | Spawn/Stop/KillWorker --------+-->+    worker N    |
                                | WorkerExited (sentinel) <-----+---+ dies, or is    |
                                | Tick(now) once                |   | killed         |
                                | core.next_deadline() passed   |   +----------------+
                                +-------------------------------+

Jobs, tasks, items
------------------
A *job* is one user call: one ``apply_async``/``submit`` (kind ``APPLY``), one
``map``/``starmap`` (``MAP``), one ``imap`` or ``Executor.map`` (``IMAP``), one
``imap_unordered`` (``IMAP_UNORDERED``). Its input is a sequence of opaque *items*. A
*task* is a chunk of consecutive items, the unit sent to a worker; the worker answers
with one result per item, or with the exception of the item that raised (plus the
results before it). The core resolves every job exactly once (``ResolveJob``) and for
streaming kinds delivers results chunk by chunk before that (``DeliverResults``): in input
order for ``IMAP`` (out-of-order chunks wait in a reorder buffer), in completion order for
``IMAP_UNORDERED``. A ``MAP`` fails with the first error to arrive, as the standard
library does; a streaming job delivers each error at its position and goes on.

Input
-----
Input given whole at submit time is kept as the driver's own sequence (no copy). Lazy
input is pulled: the core emits ``RequestInput(job, n)`` when the job's *window* has room,
the driver reads up to ``n`` items from the user's iterable and answers ``FeedInput``.
The window (``max_in_flight``) counts the job's tasks cut and not yet *released*; a task
is released when its results were delivered (or consumed, with ``ack_consumption``), so
input read ahead, work in flight and results waiting for their turn are all bounded.
``ReleaseWindow`` (and ``Close``) stop waiting for consumption: an iterator nobody reads
any more must not hold its job (and ``Pool.join()``) for ever. The core never iterates a
user iterable: it could block or raise in the wrong thread.

Chunks
------
Chunks are cut at the moment a worker is about to take one, by ``chunking.ChunkSizer``:
a fixed ``chunksize`` is respected; ``chunksize=None`` starts with one item per chunk and
grows toward a few tens of milliseconds of measured work per chunk, never beyond the
standard library's ``map`` formula when the length is known.

Workers and their lines
-----------------------
The pool has ``processes`` *slots*, each filled by at most one live worker; a worker that
dies, is killed or is recycled leaves its slot, and a new worker (a new id) takes it.
Workers are given tasks only once ready (after their initializer). Each worker has a
*line*: the task at its head is RUNNING, up to ``prefetch`` more wait behind it (SENT);
``deep_prefetch`` more for tasks measured to be short, so that tiny tasks travel in
batches without a long task ever holding work another worker could take.
Workers run their line in order and answer every task (``TaskDone``, or ``TaskSkipped``
for a task revoked before it began), so the core always knows which task a worker is
running, which makes the rest exact:

* a worker exits (``WorkerExited``): its RUNNING task fails with ``WorkerLostError``
  (or is retried, ``lost_task_retries``); tasks behind it never began and are handed back
  to the queue; its slot gets a new worker;
* a RUNNING task passes its deadline (``task_timeout`` per item, checked at every event
  and at ``Tick``): it fails with ``TaskTimeoutError``, its worker is killed
  (``KillWorker``), tasks behind it are handed back, a new worker takes the slot;
* a job is cancelled (``CancelJob``): queued tasks are cancelled, prefetched ones are
  revoked, running ones are killed (``KILL``) or left to finish unobserved
  (``ABANDON``); ``PENDING_ONLY`` cancels only a job none of whose tasks was sent;
* ``maxtasksperchild`` (or ``RetireWorker``, e.g. for a memory limit the driver watches):
  a worker that was given its quota gets no more, and is stopped and replaced once its
  line is empty; queued work simply goes to other workers;
* workers that end before ever being ready (initializer raised, could not start) are
  replaced, but ``max_start_failures`` of them in a row *break* the pool: every pending
  job fails with ``BrokenPoolError`` (chained to the initializer's exception).

States
------
Tasks move QUEUED → SENT → RUNNING → DONE / FAILED / CANCELLED, with ABANDONED → DROPPED
for tasks a worker still holds after their job stopped wanting them, and hand-backs to
QUEUED; ``states.TASK_MOVES`` is the whole table and every move is checked against it
(an illegal one raises ``InvalidTransition`` with the task's story). Workers go SPAWNING →
STARTING → READY → STOPPING / KILLING → EXITED. The pool goes RUNNING → CLOSED (no new
jobs; workers stop once all jobs are done) or TERMINATED (``Terminate``: everything killed)
or BROKEN; ``PoolStopped`` is emitted once no worker is left. ``CancelAll`` (Ctrl-C) ends
every job and kills every worker but leaves the pool RUNNING.

Driver contract
---------------
1. Call ``handle()`` from one thread at a time, with events in the order they happened.
2. Carry out instructions in order. A worker can die at any moment: sending to a dead
   worker is not an error, its ``WorkerExited`` will follow.
3. Every ``SpawnWorker`` is answered, eventually, by exactly one ``WorkerExited``; report a
   worker's own messages (``TaskDone``...) before its ``WorkerExited``.
4. Every ``SendTask`` is answered by ``TaskDone`` (``TaskSkipped`` if revoked and not
   begun) unless the worker exits; a task that could not be serialised is answered by
   ``SendFailed`` instead.
5. Send ``Tick(now)`` when ``next_deadline()`` has passed.
6. Treat ``PoolCoreError`` as fatal: kill every worker, fail every job.

Every event carries a ``stimulus_id`` that is repeated on the instructions it caused and
in ``PoolCore.story()``, which tells what happened to a task, job or worker.
"""

from __future__ import annotations

from .chunking import ChunkSizer as ChunkSizer
from .chunking import stdlib_chunksize as stdlib_chunksize
from .core import PoolConfig as PoolConfig
from .core import PoolCore as PoolCore
from .errors import BrokenPoolError as BrokenPoolError
from .errors import InvalidTransition as InvalidTransition
from .errors import PoolClosedError as PoolClosedError
from .errors import PoolCoreError as PoolCoreError
from .events import CancelAll as CancelAll
from .events import CancelJob as CancelJob
from .events import CancelMode as CancelMode
from .events import Close as Close
from .events import Consumed as Consumed
from .events import Event as Event
from .events import FeedInput as FeedInput
from .events import InputFailed as InputFailed
from .events import JobKind as JobKind
from .events import JobSpec as JobSpec
from .events import ReleaseWindow as ReleaseWindow
from .events import RetireWorker as RetireWorker
from .events import SendFailed as SendFailed
from .events import Start as Start
from .events import SubmitJob as SubmitJob
from .events import TaskDone as TaskDone
from .events import TaskProgress as TaskProgress
from .events import TaskSkipped as TaskSkipped
from .events import TaskStarted as TaskStarted
from .events import Terminate as Terminate
from .events import Tick as Tick
from .events import WorkerExited as WorkerExited
from .events import WorkerInitFailed as WorkerInitFailed
from .events import WorkerReady as WorkerReady
from .events import WorkerStarted as WorkerStarted
from .instructions import DeliverResults as DeliverResults
from .instructions import Instruction as Instruction
from .instructions import JobProgress as JobProgress
from .instructions import KillWorker as KillWorker
from .instructions import Outcome as Outcome
from .instructions import PoolStopped as PoolStopped
from .instructions import Reason as Reason
from .instructions import RequestInput as RequestInput
from .instructions import ResolveJob as ResolveJob
from .instructions import RevokeTask as RevokeTask
from .instructions import SendTask as SendTask
from .instructions import SpawnWorker as SpawnWorker
from .instructions import StopWorker as StopWorker
from .states import PoolState as PoolState
from .states import TaskState as TaskState
from .states import WorkerState as WorkerState
from .stats import PoolStatistics as PoolStatistics
from .stats import Progress as Progress
from .stats import StoryEntry as StoryEntry
from .stats import WorkerStatistics as WorkerStatistics

__all__ = [
    "PoolCore", "PoolConfig",
    # events
    "Event", "Start", "SubmitJob", "FeedInput", "InputFailed", "Consumed", "ReleaseWindow",
    "CancelJob",
    "CancelAll", "Close", "Terminate", "Tick", "WorkerStarted", "WorkerReady",
    "WorkerInitFailed", "WorkerExited", "RetireWorker", "TaskStarted", "TaskProgress",
    "TaskDone", "TaskSkipped", "SendFailed", "JobKind", "JobSpec", "CancelMode",
    # instructions
    "Instruction", "SpawnWorker", "SendTask", "RevokeTask", "StopWorker", "KillWorker",
    "RequestInput", "DeliverResults", "JobProgress", "ResolveJob", "PoolStopped",
    "Outcome", "Reason",
    # states, snapshots, errors, chunking
    "TaskState", "WorkerState", "PoolState", "Progress", "PoolStatistics",
    "WorkerStatistics", "StoryEntry", "PoolCoreError", "InvalidTransition",
    "BrokenPoolError", "PoolClosedError", "ChunkSizer", "stdlib_chunksize",
]
