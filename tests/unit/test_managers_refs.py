"""Reference counting: who keeps a shared object alive, and when it goes away."""

from __future__ import annotations

import gc
import pickle
import threading
import time

import pytest

from manyproc import _manager_client as client_side
from manyproc import _manager_wire as wire
from manyproc import process, reduction
from manyproc._proxies import RebuildProxy
from manyproc.managers import ListProxy, RemoteError, SyncManager
from tests.unit.test_managers_fixtures import KEY, ThreadedServer

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def served():
    server = ThreadedServer(SyncManager)
    yield server
    server.close()


def wait_for(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def raw_client(served):
    """A client with its own session, as another process would have."""
    return client_side.ManagerClient(served.address, KEY, wire.get_codec("pickle"))


def test_objects_live_as_long_as_their_proxies(served):
    manager = served.connect()
    a = manager.list([1])
    b = manager.dict()
    assert manager._number_of_objects() == 2
    del a
    assert wait_for(lambda: manager._number_of_objects() == 1)
    del b
    assert wait_for(lambda: manager._number_of_objects() == 0)


def test_creating_a_proxy_costs_one_request(served, monkeypatch):
    manager = served.connect()
    sent = []
    original = client_side._Link.roundtrip

    def counting(self, op, args):
        sent.append(op)
        return original(self, op, args)

    monkeypatch.setattr(client_side._Link, "roundtrip", counting)
    shared = manager.list()
    assert sent == ["create"]
    shared.append(1)  # the first call of a thread opens its connection
    assert sent == ["create", "hello", "call"]
    shared.append(2)
    del shared
    assert sent == ["create", "hello", "call", "call"]  # release needs no reply


def test_nested_proxies_keep_inner_objects_alive(served):
    manager = served.connect()
    outer = manager.list([manager.dict(x=1), manager.list([2])])
    assert manager._number_of_objects() == 3  # the inner proxies were dropped here
    inner = outer[0]
    assert inner["x"] == 1
    inner["y"] = 2
    assert outer[0].copy() == {"x": 1, "y": 2}
    del inner
    outer.pop()  # the list inside goes with the only reference to it
    assert wait_for(lambda: manager._number_of_objects() == 2)
    del outer
    assert wait_for(lambda: manager._number_of_objects() == 0)


def test_proxies_inside_replies_need_no_incref(served, monkeypatch):
    manager = served.connect()
    outer = manager.list([manager.list([1]) for _ in range(3)])
    sent = []
    original = client_side._Link.roundtrip

    def counting(self, op, args):
        sent.append(op)
        return original(self, op, args)

    monkeypatch.setattr(client_side._Link, "roundtrip", counting)
    inners = outer[:]
    assert [inner[0] for inner in inners] == [1, 1, 1]
    assert "incref" not in sent
    del inners, outer
    assert wait_for(lambda: manager._number_of_objects() == 0)


def test_a_session_that_ends_drops_its_references(served):
    manager = served.connect()
    kept = manager.list(["kept"])
    other = raw_client(served)
    ident, _exposed = other.request("create", "list", ([1, 2],), {})
    assert other.request("incref", [kept._id]) == []
    assert manager._number_of_objects() == 2
    other.close()  # what the kernel does when a client process dies
    assert wait_for(lambda: manager._number_of_objects() == 1)
    assert kept[:] == ["kept"]  # its other reference still holds it
    assert ident not in served.server._referents


def test_a_session_cannot_release_what_it_does_not_hold(served):
    manager = served.connect()
    shared = manager.list([1])
    other = raw_client(served)
    other.request("ping")
    other.release(shared._id)
    other.release("nonsense")
    other.request("ping")  # releases are processed in order
    assert shared[:] == [1]
    other.close()


def test_incref_reports_objects_that_are_gone(served):
    other = raw_client(served)
    assert other.request("incref", ["deadbeef:1", 7]) == ["deadbeef:1", 7]
    other.close()


def test_unpickling_a_proxy_takes_a_reference(served):
    manager = served.connect()
    shared = manager.list([1, 2])
    copy = pickle.loads(reduction.dumps(shared))
    assert isinstance(copy, ListProxy) and copy is not shared
    del shared
    assert copy[:] == [1, 2]  # the copy's own reference keeps it
    assert manager._number_of_objects() == 1
    del copy
    assert wait_for(lambda: manager._number_of_objects() == 0)


def test_unpickling_a_proxy_whose_object_is_gone_says_so(served):
    manager = served.connect()
    shared = manager.list()
    data = reduction.dumps(shared)
    del shared
    with pytest.raises(RemoteError, match="no longer exists"):
        pickle.loads(data)


def _pickled_kwds(proxy):
    func, args = proxy.__reduce__()
    assert func is RebuildProxy
    return args[3]


def test_custom_authkey_travels_with_the_proxy_but_not_to_its_server(served):
    manager = served.connect()
    shared = manager.list()
    assert bytes(process.current_process().authkey) != KEY
    assert _pickled_kwds(shared)["authkey"] == KEY
    with client_side.context("sending_to", client_side.tag_of(shared._id)):
        assert "authkey" not in _pickled_kwds(shared)


def test_the_process_authkey_never_travels_in_a_pickle():
    key = bytes(process.current_process().authkey)
    server = ThreadedServer(SyncManager, authkey=key)
    try:
        manager = server.connect()
        assert "authkey" not in _pickled_kwds(manager.list())
    finally:
        server.close()


def test_adopt_is_honoured_only_from_the_objects_server(served):
    manager = served.connect()
    shared = manager.list([5])
    kwds = dict(_pickled_kwds(shared), adopt=True)
    # From a queue or a pipe: the flag is ignored and a reference is taken.
    copy = RebuildProxy(type(shared), shared._token, "pickle", kwds)
    del shared
    assert copy[:] == [5]


def test_interrupted_requests_leave_no_stale_reply_behind(served):
    manager = served.connect()
    client = client_side.client_for(served.address, KEY, "pickle")
    client.request("ping")
    link = client._session
    # A request whose caller gave up (Ctrl-C) before reading the reply...
    link.send(wire.Request(next(link.seq), "count", ()))
    creating = next(link.seq)
    link.send(wire.Request(creating, "create", ("list", ([1],), {})))
    link.creates[creating] = None
    # ...is skipped by the next one, and what it created is given back.
    assert client.request("ping") is None
    assert manager._number_of_objects() == 0


def test_releases_wait_while_the_session_is_busy(served):
    manager = served.connect()
    client = client_side.client_for(served.address, KEY, "pickle")
    shared = manager.list()
    with client._lock:
        del shared
        gc.collect()
        assert list(client._pending)  # queued, not sent under someone else's lock
    assert manager._number_of_objects() == 0


def test_release_from_another_thread(served):
    manager = served.connect()
    shared = manager.list()
    holder = [shared]
    del shared
    thread = threading.Thread(target=holder.clear)
    thread.start()
    thread.join(5)
    assert manager._number_of_objects() == 0


def test_debug_info_lists_objects(served):
    manager = served.connect()
    shared = manager.list(["visible"])
    info = manager._debug_info()
    assert shared._id in info and "refcount=1" in info and "visible" in info


def test_shutdown_of_a_connected_manager_leaves_the_server_alone(served):
    manager = served.connect()
    shared = manager.list([1])
    manager.shutdown()
    assert served.thread.is_alive()
    assert shared[:] == [1]
    with pytest.raises(Exception, match="shut down"):
        manager.list()


def test_many_threads_creating_and_dropping_objects(served):
    manager = served.connect()
    errors = []

    def churn(n):
        try:
            for i in range(60):
                outer = manager.list([manager.dict(n=n, i=i)])
                assert outer[0]["i"] == i
                del outer
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=churn, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    gc.collect()
    assert wait_for(lambda: manager._number_of_objects() == 0)
