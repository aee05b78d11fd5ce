"""SyncManager's shared types through their proxies, against a server in a thread.

Each proxy is checked against the real object it stands for: the same calls give
the same results and the same exceptions.
"""

from __future__ import annotations

import collections.abc
import copy
import queue
import threading

import pytest

from manyproc.managers import (
    AcquirerProxy,
    BaseManager,
    DictProxy,
    IteratorProxy,
    ListProxy,
    Namespace,
    PoolProxy,
    RemoteError,
    SetProxy,
    SyncManager,
    ValueProxy,
)
from tests.unit.test_managers_fixtures import ThreadedServer

pytestmark = pytest.mark.timeout(30)


@pytest.fixture(scope="module")
def served():
    server = ThreadedServer(SyncManager)
    yield server
    server.close()


@pytest.fixture
def manager(served):
    return served.connect()


def test_list_proxy_matches_a_list(manager):
    real = [3, 1, 2]
    shared = manager.list(real)
    assert isinstance(shared, ListProxy)
    assert isinstance(shared, collections.abc.MutableSequence)
    for name, args in [("append", (5,)), ("extend", ([7, 7],)), ("insert", (0, 9)),
                       ("remove", (7,)), ("sort", ()), ("reverse", ()), ("pop", ()),
                       ("pop", (0,)), ("count", (7,)), ("index", (2,))]:
        assert getattr(shared, name)(*args) == getattr(real, name)(*args), name
        assert shared[:] == real, name
    assert shared.copy() == real.copy()
    assert len(shared) == len(real)
    assert 2 in shared and 99 not in shared
    assert shared + [0] == real + [0]
    assert shared * 2 == real * 2
    assert 2 * shared == 2 * real
    assert list(reversed(shared)) == list(reversed(real))
    assert list(shared) == real  # iteration through __getitem__
    shared[0] = "x"
    real[0] = "x"
    del shared[-1]
    del real[-1]
    assert shared[:] == real
    shared.sort(key=str, reverse=True)
    real.sort(key=str, reverse=True)
    assert shared[:] == real
    same = shared
    shared += [1]
    shared *= 2
    assert shared is same
    assert shared[:] == (real + [1]) * 2
    shared.clear()
    assert shared[:] == [] and len(shared) == 0
    with pytest.raises(IndexError):
        shared[3]
    with pytest.raises(ValueError):
        shared.index(42)
    assert copy.deepcopy(manager.list([1, [2]])) == [1, [2]]
    assert ListProxy[int] is not None


def test_dict_proxy_matches_a_dict(manager):
    real = {"a": 1, "b": 2}
    shared = manager.dict(real)
    assert isinstance(shared, DictProxy)
    assert isinstance(shared, collections.abc.MutableMapping)
    assert shared.copy() == real
    assert shared.keys() == list(real.keys())  # views travel as lists
    assert shared.values() == list(real.values())
    assert shared.items() == list(real.items())
    assert shared.get("a") == 1 and shared.get("zz", 0) == 0
    assert shared.setdefault("c", 3) == real.setdefault("c", 3)
    shared.update(d=4)
    real.update(d=4)
    assert shared | {"e": 5} == real | {"e": 5}
    assert {"e": 5} | shared == {"e": 5} | real
    same = shared
    shared |= {"f": 6}
    real |= {"f": 6}
    assert shared is same and shared.copy() == real
    assert list(reversed(shared)) == list(reversed(real))
    assert shared.fromkeys(["x", "y"], 0) == dict.fromkeys(["x", "y"], 0)
    assert list(shared) == list(real)
    assert isinstance(iter(shared), IteratorProxy)
    assert shared.pop("a") == real.pop("a")
    assert shared.popitem() == real.popitem()
    assert len(shared) == len(real) and ("b" in shared) == ("b" in real)
    del shared["b"]
    del real["b"]
    assert shared.copy() == real
    with pytest.raises(KeyError) as info:
        shared["missing"]
    assert "missing" in str(info.value)
    shared.clear()
    assert len(shared) == 0
    assert DictProxy[str, int] is not None


def test_dict_iterator_sees_changes_in_the_server(manager):
    shared = manager.dict({1: "a", 2: "b"})
    it = iter(shared)
    assert list(it) == [1, 2]
    assert list(it) == []  # exhausted
    it = iter(shared)
    shared.clear()
    with pytest.raises(RuntimeError, match="changed size"):
        next(it)


def test_set_proxy_matches_a_set(manager):
    real = {1, 2, 3}
    shared = manager.set(real)
    assert isinstance(shared, SetProxy)
    assert isinstance(shared, collections.abc.MutableSet)
    other = {3, 4}
    for name in ("union", "intersection", "difference", "symmetric_difference",
                 "isdisjoint", "issubset", "issuperset"):
        assert getattr(shared, name)(other) == getattr(real, name)(other), name
    assert shared | other == real | other
    assert shared & other == real & other
    assert shared - other == real - other
    assert shared ^ other == real ^ other
    assert other | shared == other | real
    assert other - shared == other - real
    assert (shared <= {1, 2, 3, 9}) and not (shared < {1, 2})
    assert sorted(shared) == sorted(real)
    shared.add(7)
    shared.discard(1)
    shared.remove(2)
    real |= {7}
    real -= {1, 2}
    assert shared.copy() == real
    same = shared
    shared |= {10}
    shared &= {3, 7, 10}
    shared ^= {3, 11}
    shared -= {11}
    assert shared is same and shared.copy() == {7, 10}
    shared.update({1})
    shared.difference_update({7})
    shared.intersection_update({1, 10})
    shared.symmetric_difference_update({1, 2})
    assert shared.copy() == {10, 2}
    assert shared.pop() in {10, 2}
    shared.clear()
    assert len(shared) == 0
    with pytest.raises(KeyError):
        shared.remove(99)


def test_namespace_proxy(manager):
    ns = manager.Namespace()
    ns.name = "Bob"
    ns.job = "Builder"
    ns._hidden = "local"  # underscore names belong to the proxy
    assert (ns.name, ns.job) == ("Bob", "Builder")
    del ns.job
    assert str(ns) == "Namespace(name='Bob')"
    assert not hasattr(ns, "job")
    with pytest.raises(AttributeError):
        ns.nothing
    assert repr(Namespace(b=2, a=1, _c=3)) == "Namespace(a=1, b=2)"


def test_value_and_array(manager):
    value = manager.Value("i", 1)
    assert isinstance(value, ValueProxy)
    assert value.value == 1 and value.get() == 1
    value.value = 5
    value.set(value.get() + 1)
    assert value.value == 6
    assert "Value('i', 6)" in str(value)
    array = manager.Array("i", [0, 1, 2])
    assert len(array) == 3 and array[1] == 1 and list(array) == [0, 1, 2]
    array[0] = 9
    assert array[0] == 9
    assert ValueProxy[int] is not None


@pytest.mark.parametrize("typeid", ["Lock", "RLock", "Semaphore", "BoundedSemaphore"])
def test_acquirers(manager, typeid):
    lock = getattr(manager, typeid)()
    assert isinstance(lock, AcquirerProxy)
    assert lock.locked() is False
    assert lock.acquire() is True
    assert lock.locked() is True
    lock.release()
    assert lock.acquire(timeout=0.5) is True
    lock.release()
    with lock:
        assert lock.locked()
    assert not lock.locked()
    assert repr(lock).startswith(f"<AcquirerProxy object, typeid {typeid!r} at ")


def test_lock_held_elsewhere_times_out(manager):
    lock = manager.Lock()
    lock.acquire()
    got = []
    thread = threading.Thread(target=lambda: got.append(lock.acquire(True, 0.05)))
    thread.start()
    thread.join(10)
    assert got == [False]
    lock.release()
    with pytest.raises(RuntimeError):
        lock.release()  # an unlocked lock, as threading says


def test_event_condition_barrier(manager):
    event = manager.Event()
    assert not event.is_set() and event.wait(0.01) is False
    event.set()
    assert event.is_set() and event.wait() is True
    event.clear()
    assert not event.is_set()

    cond = manager.Condition()
    with cond:
        assert cond.wait(0.01) is False
        assert cond.wait_for(lambda: True) is True
        assert cond.wait_for(lambda: 0, timeout=0.02) == 0
        cond.notify()
        cond.notify_all()
    assert not cond.locked()

    barrier = manager.Barrier(2, timeout=5)
    assert (barrier.parties, barrier.n_waiting, barrier.broken) == (2, 0, False)
    arrived = []
    thread = threading.Thread(target=lambda: arrived.append(barrier.wait()))
    thread.start()
    arrived.append(barrier.wait())
    thread.join(10)
    assert sorted(arrived) == [0, 1]
    barrier.abort()
    assert barrier.broken
    with pytest.raises(threading.BrokenBarrierError):
        barrier.wait()
    barrier.reset()
    assert not barrier.broken


def test_queues(manager):
    q = manager.Queue(2)
    q.put(1)
    q.put_nowait(2)
    assert q.full() and q.qsize() == 2
    with pytest.raises(queue.Full):
        q.put(3, timeout=0.01)
    assert q.get() == 1 and q.get_nowait() == 2
    with pytest.raises(queue.Empty):
        q.get(timeout=0.01)
    jq = manager.JoinableQueue()
    jq.put("job")
    jq.get()
    jq.task_done()
    jq.join()


def test_threads_each_get_their_own_connection(manager):
    q = manager.Queue()
    results = []

    def consumer():
        results.append(q.get(timeout=10))

    threads = [threading.Thread(target=consumer) for _ in range(4)]
    for t in threads:
        t.start()
    # While four threads wait in get(), this thread can still use the manager.
    shared = manager.list()
    for n in range(4):
        shared.append(n)
        q.put(n)
    for t in threads:
        t.join(10)
    assert sorted(results) == [0, 1, 2, 3] and shared[:] == [0, 1, 2, 3]


class Counter:
    def __init__(self, start=0):
        self.value = start

    def bump(self, by=1):
        self.value += by
        return self.value

    def fail(self):
        raise LookupError("nothing here")

    def numbers(self):
        return iter(range(3))

    def _private(self):
        return "secret"


class CounterManager(BaseManager):
    pass


CounterManager.register("Counter", Counter)
CounterManager.register("Exposed", Counter, exposed=("bump", "_private"))
CounterManager.register("Iterating", Counter, method_to_typeid={"numbers": "Iterator"})
CounterManager.register("Iterator", proxytype=IteratorProxy, create_method=False)


@pytest.fixture(scope="module")
def counter_server():
    server = ThreadedServer(CounterManager)
    yield server
    server.close()


def test_custom_types_and_autoproxy(counter_server):
    manager = counter_server.connect()
    counter = manager.Counter(10)
    assert [name for name in ("bump", "fail", "_private") if hasattr(counter, name)] == [
        "bump", "fail"]
    assert counter.bump() == 11 and counter.bump(by=4) == 15
    assert counter._callmethod("bump", (1,)) == 16
    assert counter._getvalue().value == 16
    with pytest.raises(LookupError, match="nothing here"):
        counter.fail()
    with pytest.raises(RemoteError, match="not exposed"):
        counter._callmethod("_private")
    exposed = manager.Exposed()
    assert exposed._private() == "secret"
    assert not hasattr(exposed, "fail")
    iterating = manager.Iterating()
    numbers = iterating.numbers()
    assert isinstance(numbers, IteratorProxy)
    assert list(numbers) == [0, 1, 2]


def test_referent_exception_carries_the_server_traceback(counter_server):
    counter = counter_server.connect().Counter()
    with pytest.raises(LookupError) as info:
        counter.fail()
    cause = info.value.__cause__
    assert cause is not None and "Traceback" in str(cause)
    assert "in fail" in str(cause)
    assert 'raise LookupError("nothing here")' in str(cause)


def test_manager_repr_and_address(counter_server):
    manager = counter_server.connect()
    assert manager.address == counter_server.address
    assert "started" in repr(manager)


class FakeResult:
    def __init__(self, value):
        self._value = value

    def get(self, timeout=None):
        return self._value

    def ready(self):
        return True


class FakePool:
    """Stands in for manyproc.pool.Pool: exercises PoolProxy's plumbing without processes."""

    def __init__(self, processes=None):
        if processes is not None and processes < 1:
            raise ValueError("Number of processes must be at least 1")
        self.terminated = False

    def apply(self, func, args=(), kwds=None):
        return func(*args, **(kwds or {}))

    def apply_async(self, func, args=(), kwds=None, callback=None, error_callback=None):
        value = func(*args, **(kwds or {}))
        if callback is not None:
            callback(value)
        return FakeResult(value)

    def map(self, func, iterable, chunksize=None):
        return [func(x) for x in iterable]

    def map_async(self, func, iterable, chunksize=None, callback=None, error_callback=None):
        return FakeResult(self.map(func, iterable))

    def imap(self, func, iterable, chunksize=1):
        return (func(x) for x in iterable)

    imap_unordered = imap

    def starmap(self, func, iterable, chunksize=None):
        return [func(*x) for x in iterable]

    def starmap_async(self, func, iterable, chunksize=None, callback=None,
                      error_callback=None):
        return FakeResult(self.starmap(func, iterable))

    def close(self):
        pass

    def join(self):
        pass

    def terminate(self):
        self.terminated = True


class PoolManager(SyncManager):
    pass


PoolManager.register("Pool", FakePool, PoolProxy)


def test_pool_proxy_plumbing():
    server = ThreadedServer(PoolManager)
    try:
        manager = server.connect()
        collected = manager.list()
        with manager.Pool(2) as pool:
            assert isinstance(pool, PoolProxy)
            assert pool.apply(abs, (-3,)) == 3
            assert pool.map(abs, [-1, 2]) == [1, 2]
            assert pool.starmap(pow, [(2, 3)]) == [8]
            result = pool.apply_async(abs, (-5,), callback=collected.append)
            assert result.get(timeout=5) == 5 and result.ready()
            assert pool.map_async(abs, [-6]).get() == [6]
            assert pool.starmap_async(pow, [(3, 2)]).get() == [9]
            it = pool.imap(abs, [-7, -8])
            assert isinstance(it, IteratorProxy) and list(it) == [7, 8]
            assert list(pool.imap_unordered(abs, [-9])) == [9]
        assert collected[:] == [5]  # the callback ran in the server, through a proxy
        with pytest.raises(RemoteError):
            manager.Pool(0)
    finally:
        server.close()
