"""The transport's per-thread pickler gives exactly what reduction.dumps gives."""

from __future__ import annotations

import os
import pickle
import threading

import pytest

from manyproc import connection, reduction
from manyproc.connection import Pipe

pytestmark = pytest.mark.timeout(30)


class Loud:
    """Pickles through a reducer that itself pickles (a nested call)."""

    def __init__(self, inner):
        self.inner = inner

    def __reduce__(self):
        return (Loud, (pickle.loads(connection._dumps(self.inner)),))


def joined(parts):
    if isinstance(parts, bytes):
        return parts
    return b"".join(bytes(p) for p in parts)


@pytest.mark.parametrize("obj", [
    None, 0, "x" * 10, ("task", 42, {"x": 1.5}), list(range(50_000)), os.urandom(300_000),
    [os.urandom(100_000), "mid", os.urandom(70_000)], bytearray(b"z" * 200_000),
])
def test_same_bytes_as_reduction_dumps(obj):
    parts = connection._pickle(obj)
    assert joined(parts) == reduction.dumps(obj)
    assert pickle.loads(joined(parts)) == obj


def test_functions_defined_by_value_still_go_through_cloudpickle():
    square = lambda x: x * x  # noqa: E731
    assert pickle.loads(connection._dumps(square))(7) == 49


def test_large_bytes_are_not_copied_but_mutable_buffers_are():
    big = os.urandom(200_000)
    parts = connection._pickle(("head", big))
    assert any(p is big for p in parts)
    mutable = bytearray(200_000)
    parts = connection._pickle(mutable)
    mutable[:5] = b"later"
    assert pickle.loads(joined(parts)) == bytearray(200_000)  # a snapshot at pickling time


def test_nested_pickling_from_a_reducer():
    obj = Loud(Loud([1, 2, 3]))
    assert pickle.loads(connection._dumps(obj)).inner.inner == [1, 2, 3]


def test_failure_is_explained_and_the_next_call_works():
    with pytest.raises(TypeError, match="cannot pickle.*lock"):
        connection._dumps({"lock": threading.Lock()})
    assert pickle.loads(connection._dumps("fine")) == "fine"


def test_reducers_registered_later_are_used():
    class Late:
        pass

    connection._dumps(1)  # the thread's pickler exists now
    reduction.register(Late, lambda obj: (str, ("rebuilt by a late reducer",)))
    try:
        assert pickle.loads(connection._dumps(Late())) == "rebuilt by a late reducer"
    finally:
        del reduction.ForkingPickler._extra_reducers[Late]


def test_each_thread_has_its_own_pickler():
    results = []

    def work(i):
        results.append(all(pickle.loads(connection._dumps((i, j))) == (i, j)
                           for j in range(2000)))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [True] * 4


def test_the_message_is_not_kept_alive_by_the_pickler():
    import weakref

    class Big:
        pass

    obj = Big()
    ref = weakref.ref(obj)
    a, b = Pipe()
    with a, b:
        a.send(obj)
        del obj
        assert ref() is None
        b.recv()
