"""Bad input to managers and proxies: each gets a clear error, and the server stays up."""

from __future__ import annotations

import os
import socket
import threading

import pytest

from manyproc import ProcessError
from manyproc.managers import (
    BaseManager,
    ManagerNotStartedError,
    RemoteError,
    SyncManager,
)
from tests.unit.test_managers_fixtures import KEY, ThreadedServer

pytestmark = pytest.mark.timeout(30)


class Awkward:
    def lock(self):
        return threading.Lock()  # cannot be pickled

    def echo(self, value):
        return value

    def broken(self):
        raise ValueError("referent failed")


class ServerSide(BaseManager):
    pass


ServerSide.register("Awkward", Awkward)
ServerSide.register("shared", None)


class ClientSide(BaseManager):
    pass


ClientSide.register("Awkward")
ClientSide.register("Ghost")  # the server knows nothing of it


@pytest.fixture(scope="module")
def served():
    server = ThreadedServer(ServerSide)
    yield server
    server.close()


def still_serving(served):
    assert served.connect(ClientSide).Awkward().echo("alive") == "alive"


def test_unknown_typeid(served):
    manager = served.connect(ClientSide)
    with pytest.raises(RemoteError) as info:
        manager.Ghost()
    text = str(info.value)
    assert "'Ghost'" in text and "registered: Awkward, shared" in text and "register(" in text
    still_serving(served)


def test_method_not_exposed(served):
    awkward = served.connect(ClientSide).Awkward()
    with pytest.raises(RemoteError) as info:
        awkward._callmethod("__dict__")
    assert "not exposed" in str(info.value) and "broken, echo, lock" in str(info.value)
    still_serving(served)


def test_referent_that_raises(served):
    awkward = served.connect(ClientSide).Awkward()
    with pytest.raises(ValueError, match="referent failed") as info:
        awkward.broken()
    assert "Traceback" in str(info.value.__cause__)
    assert awkward.echo(1) == 1


def test_unpicklable_result(served):
    awkward = served.connect(ClientSide).Awkward()
    with pytest.raises(RemoteError) as info:
        awkward.lock()
    text = str(info.value)
    assert "could not send back the result" in text and "lock" in text
    assert awkward.echo(2) == 2  # the same connection goes on


def test_unpicklable_argument_fails_before_sending(served):
    awkward = served.connect(ClientSide).Awkward()
    with pytest.raises(TypeError, match="lock"):
        awkward.echo(threading.Lock())
    assert awkward.echo(3) == 3


def test_creating_without_callable_takes_one_argument(served):
    manager = served.connect(ServerSide)
    shared = manager.shared([1, 2])
    assert shared.count(1) == 1
    with pytest.raises(RemoteError, match="exactly one positional argument"):
        manager.shared(1, 2)


def test_constructor_errors_come_back_with_their_cause():
    server = ThreadedServer(SyncManager)
    try:
        manager = server.connect()
        with pytest.raises(RemoteError) as info:
            manager.Value()  # missing arguments
        assert "creating a shared 'Value' failed" in str(info.value)
        assert isinstance(info.value.__cause__, TypeError)
        assert manager.list([1])[:] == [1]
    finally:
        server.close()


def test_second_start_and_start_after_shutdown(served):
    manager = served.connect(ClientSide)
    with pytest.raises(ProcessError, match="already started"):
        manager.start()
    with pytest.raises(ProcessError, match="already started"):
        manager.get_server()
    manager.shutdown()
    with pytest.raises(ProcessError, match="shut down"):
        manager.start()
    with pytest.raises(ProcessError, match="shut down"):
        with manager:
            pass


def test_creating_before_start():
    manager = SyncManager(authkey=KEY)
    with pytest.raises(ManagerNotStartedError, match="call start"):
        manager.list()
    assert isinstance(ManagerNotStartedError("x"), ValueError)


def test_connect_to_nothing(tmp_path):
    missing = str(tmp_path / "no-such.sock")
    with pytest.raises(FileNotFoundError, match="no manager is listening"):
        SyncManager(address=missing, authkey=KEY).connect()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again at once: nothing listens there
    with pytest.raises(ConnectionRefusedError, match=f"127.0.0.1:{port}"):
        SyncManager(address=("127.0.0.1", port), authkey=KEY).connect()
    with pytest.raises(ValueError, match="address"):
        SyncManager(authkey=KEY).connect()


def test_constructor_checks():
    with pytest.raises(ValueError, match="serializer"):
        SyncManager(serializer="json")
    with pytest.raises(TypeError, match="authkey must be bytes"):
        SyncManager(authkey="text")
    with pytest.raises(ValueError, match="max_message_size"):
        SyncManager(max_message_size=0)
    with pytest.raises(TypeError, match="ssl_context"):
        SyncManager(address=("127.0.0.1", 0), ssl_context="cert.pem")
    with pytest.raises(ValueError, match="TLS is for TCP"):
        SyncManager(address="/tmp/x.sock", ssl_context=lambda: None)


def test_start_checks_its_initializer():
    manager = SyncManager(authkey=KEY)
    with pytest.raises(TypeError, match="initializer must be a callable"):
        manager.start(1)


class Registering(BaseManager):
    pass


@pytest.mark.parametrize("kwargs, words", [
    ({"typeid": 3}, "typeid"),
    ({"typeid": "x", "callable": 5}, "callable"),
    ({"typeid": "x", "exposed": "append"}, "exposed"),
    ({"typeid": "x", "exposed": ["ok", 3]}, "exposed"),
    ({"typeid": "x", "method_to_typeid": {"f": 1}}, "method_to_typeid"),
    ({"typeid": "x", "method_to_typeid": [("f", "g")]}, "method_to_typeid"),
])
def test_register_checks(kwargs, words):
    with pytest.raises(TypeError, match=words):
        Registering.register(**kwargs)


def test_register_keeps_registries_apart():
    class One(BaseManager):
        pass

    class Two(One):
        pass

    One.register("a", list)
    Two.register("b", dict)
    assert "b" not in One._registry and "a" in Two._registry
    assert "a" not in BaseManager._registry
    assert One.a.__name__ == "a" and One.a.__qualname__ == "One.a"


def test_refuses_a_public_address_without_an_explicit_key():
    with pytest.raises(ValueError) as info:
        SyncManager(address=("0.0.0.0", 0)).get_server()
    assert "authkey=os.urandom(32)" in str(info.value) and "0.0.0.0:0" in str(info.value)
    with pytest.raises(ValueError, match="empty authkey"):
        SyncManager(address=("", 0), authkey=b"").get_server()
    server = SyncManager(address=("0.0.0.0", 0), authkey=os.urandom(16)).get_server()
    server.listener.close()
    # Loopback and Unix sockets are fine with the process's own key.
    SyncManager(address=("127.0.0.1", 0)).get_server().listener.close()
    SyncManager().get_server().listener.close()


class Exiting:
    def leave(self):
        raise SystemExit(3)


class ExitingManager(BaseManager):
    pass


ExitingManager.register("Exiting", Exiting)


def test_a_referent_raising_system_exit_does_not_stop_the_server():
    server = ThreadedServer(ExitingManager)
    try:
        exiting = server.connect().Exiting()
        with pytest.raises(SystemExit):
            exiting.leave()
        with pytest.raises(SystemExit):
            exiting.leave()  # the same connection still serves
    finally:
        server.close()
