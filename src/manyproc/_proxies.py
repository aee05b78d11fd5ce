"""Proxies: local stand-ins for objects that live in a manager's server.

A proxy holds a :class:`Token` (typeid, server address, ident) and one
reference to the shared object, which keeps it alive in the server.  Calling a
proxy's method sends the call to the server over this thread's connection and
returns a copy of the result; an exception raised there is raised here, as its
own type, with the server's traceback as its ``__cause__``.

How a proxy comes by its reference:

* made by ``manager.typeid(...)`` or returned by a method listed in
  ``method_to_typeid``: the server already counted it for this process's session;
* unpickled in another process (sent through a queue, a pipe, as a Process
  argument): it takes one (``incref``) over that process's own session;
* inherited by a forked child: the child takes one for each inherited proxy, in
  one request per manager;
* unpickled inside the server itself (a proxy stored in a shared list): the
  server holds it directly, without any connection.

The reference is given back when the proxy is garbage collected, or all at
once when the process's session closes (the process exited or was killed).
"""

from __future__ import annotations

import collections
import collections.abc
import sys
import threading
import types
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from . import _manager_client as client_side
from . import _manager_wire as wire
from . import process, util
from .reduction import get_spawning_popen

__all__ = [
    "Token", "BaseProxy", "RebuildProxy", "AutoProxy", "MakeProxyType", "IteratorProxy",
    "AcquirerProxy", "ConditionProxy", "EventProxy", "BarrierProxy", "NamespaceProxy",
    "ValueProxy", "ListProxy", "DictProxy", "SetProxy", "ArrayProxy", "PoolProxy", "ADOPT",
    "adopting",
]


class Token:
    """Names one shared object: its type id, its manager's address and its ident."""

    __slots__ = ("typeid", "address", "id")

    def __init__(self, typeid: Any, address: Any, id: Any) -> None:  # noqa: A002
        self.typeid = typeid
        self.address = address
        self.id = id

    def __getstate__(self) -> tuple[Any, Any, Any]:
        return (self.typeid, self.address, self.id)

    def __setstate__(self, state: tuple[Any, Any, Any]) -> None:
        self.typeid, self.address, self.id = state

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(typeid={self.typeid!r}, address={self.address!r}, "
                f"id={self.id!r})")


class _Adopt:
    """``incref=ADOPT``: the server already counted a reference for this process."""

    def __bool__(self) -> bool:
        return True

    def __repr__(self) -> str:
        return "ADOPT"


ADOPT: Any = _Adopt()

_adoption = threading.local()


@contextmanager
def adopting(ident: str, from_session: str | None = None) -> Iterator[None]:
    """Within the block, a proxy made for ``ident`` takes over a reference counted already:
    this process's (``from_session=None``), or one reserved by the parent process's session
    while it started this child (whatever ``incref`` a proxy subclass passes on)."""
    previous = getattr(_adoption, "ident", None), getattr(_adoption, "source", None)
    _adoption.ident, _adoption.source = ident, from_session
    try:
        yield
    finally:
        _adoption.ident, _adoption.source = previous

# Proxies of this process that hold a reference through a session (re-taken after fork).
_live: weakref.WeakSet[BaseProxy] = weakref.WeakSet()


def _release(address: Any, serializer: str, authkey: bytes, ident: str) -> None:
    """Finalizer of a proxy: give its reference back to the server."""
    try:
        client = client_side.existing_client(address, serializer, authkey)
        if client is not None:
            client.release(ident)
    except Exception:  # interpreter shutdown, closed sockets: the session end covers it
        pass


class BaseProxy:
    """Base class of proxies: forwards method calls to the shared object in the server.

    Args:
        token: which shared object this proxy stands for.
        serializer: ``'pickle'`` or ``'xmlrpclib'``, as the manager's.
        manager: the manager that created the object, if known in this process.
        authkey: the manager's key (default: the manager's, or this process's).
        exposed: the method names the server allows (used by :func:`AutoProxy`).
        incref: take a reference for this proxy (``False``: a proxy that does not
            keep the object alive).
        manager_owned: the proxy lives inside the server process itself.
    """

    _isauto = False
    _cached_client: tuple[int, client_side.ManagerClient] | None = None

    def __init__(self, token: Token, serializer: str, manager: Any = None,
                 authkey: bytes | None = None, exposed: Any = None, incref: Any = True,
                 manager_owned: bool = False) -> None:
        token.address = wire.normalize_address(token.address)
        self._token = token
        self._id = token.id
        self._manager = manager
        self._serializer = serializer
        self._owned_by_manager = bool(manager_owned)
        self._holds_ref = False
        self._finalizer: weakref.finalize[Any, Any] | None = None
        if authkey is None:
            if manager is not None:
                authkey = manager._authkey
            else:
                existing = client_side.existing_client(token.address, serializer)
                authkey = existing.authkey if existing is not None \
                    else process.current_process().authkey
        self._authkey = process.AuthenticationString(authkey)
        if manager_owned:
            self._hold_in_server()
        elif incref is ADOPT or (incref and getattr(_adoption, "ident", None) == token.id):
            source = getattr(_adoption, "source", None)
            _adoption.ident = _adoption.source = None
            if source is None:
                self._adopt()
            else:
                self._take_over(source)
        elif incref:
            self._incref()

    # ----------------------------------------------------------------- references

    def _client(self) -> client_side.ManagerClient:
        cached = self._cached_client
        if cached is not None and not cached[1].closed and cached[0] == client_side.generation:
            return cached[1]
        client = client_side.client_for(self._token.address, self._authkey, self._serializer)
        self._cached_client = (client_side.generation, client)
        return client

    def _incref(self) -> None:
        """Take a reference to the shared object for this proxy."""
        if self._owned_by_manager:
            return
        missing = self._client().request("incref", [self._id])
        if missing:
            raise wire.RemoteError(
                f"shared {self._token.typeid!r} object {self._id!r} no longer exists in the "
                f"manager at {wire.format_address(self._token.address)}: its last proxy went "
                "away before this one arrived (keep a proxy alive until the receiver has "
                "it), or the manager was restarted\n")
        self._adopt()

    def _take_over(self, from_session: str) -> None:
        """Take the reference the parent reserved for this child when it pickled the proxy."""
        missing = self._client().request("adopt", from_session, [self._id])
        if missing:
            raise wire.RemoteError(
                f"shared {self._token.typeid!r} object {self._id!r} no longer exists in the "
                f"manager at {wire.format_address(self._token.address)} (the manager was "
                "restarted?)\n")
        self._adopt()

    def _adopt(self) -> None:
        self._holds_ref = True
        self._finalizer = weakref.finalize(self, _release, self._token.address,
                                           self._serializer, bytes(self._authkey), self._id)
        self._finalizer.atexit = False
        _live.add(self)

    def _hold_in_server(self) -> None:
        server = client_side.codec_context.request_server
        if server is not None and server.tag == client_side.tag_of(self._id) \
                and server.hold_internal(self._id):
            self._finalizer = weakref.finalize(self, server.release_internal, self._id)
            self._finalizer.atexit = False

    # ----------------------------------------------------------------- calls

    def _callmethod(self, methodname: str, args: Any = (), kwds: Any = None) -> Any:
        """Call ``methodname`` of the shared object in the server; return (a copy of) the result.

        Raises:
            Exception: whatever the method raised, as its own type, with the server's
                traceback as ``__cause__``.
            RemoteError: the server refused the call (method not exposed, object gone...).
            ManagerConnectionError: the server cannot be reached any more.
        """
        reply = self._client().call(self._id, methodname, tuple(args), dict(kwds or {}))
        if reply.status == "ok":
            return reply.value
        if reply.status == "proxy":
            return self._proxy_from(reply.value)
        if reply.status == "raised":
            raise wire.raised_from_reply(reply.value)
        raise wire.error_from_reply(reply.value)

    def _getvalue(self) -> Any:
        """Return a copy of the shared object."""
        return self._callmethod("#GETVALUE")

    def _proxy_from(self, value: Any) -> Any:
        typeid, ident, exposed, proxytype_name = value
        token = Token(typeid, self._token.address, ident)
        proxytype = _resolve_proxytype(self._manager, typeid, proxytype_name)
        with adopting(ident):
            return proxytype(token, self._serializer, manager=self._manager,
                             authkey=self._authkey, exposed=exposed)

    # ----------------------------------------------------------------- pickling

    def __reduce__(self) -> Any:
        kwds: dict[str, Any] = {}
        ctx = client_side.codec_context
        tag = client_side.tag_of(self._id)
        replying = ctx.replying is not None and ctx.replying[0].tag == tag
        if get_spawning_popen() is not None:
            kwds["authkey"] = self._authkey
            reserved = self._reserve_for_child()
            if reserved is not None:
                kwds["reserved"] = reserved
        elif (ctx.sending_to != tag and not replying
              and bytes(self._authkey) != bytes(process.current_process().authkey)):
            # A key of its own: the receiver cannot know it otherwise (never sent to the
            # manager itself, which holds it already).
            kwds["authkey"] = bytes(self._authkey)
        if replying:
            ctx.replying[1].append(self._id)  # type: ignore[index]
            kwds["adopt"] = True
        if client_side.uses_tls(self._token.address):
            kwds["tls"] = True
        if self._isauto:
            kwds["exposed"] = self._exposed_  # type: ignore[attr-defined]
            return RebuildProxy, (AutoProxy, self._token, self._serializer, kwds)
        return RebuildProxy, (type(self), self._token, self._serializer, kwds)

    def _reserve_for_child(self) -> str | None:
        """Take a reference the child being started will take over, so the object outlives
        this proxy even if it goes away before the child has unpickled its copy."""
        if not self._holds_ref:
            return None
        try:
            client = self._client()
            if client.request("incref", [self._id]):
                return None
        except Exception:
            return None  # the child will try an incref of its own, and say what failed
        return client.session_id

    def __deepcopy__(self, memo: Any) -> Any:
        return self._getvalue()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} object, typeid {self._token.typeid!r} at {id(self):#x}>"

    def __str__(self) -> str:
        try:
            return str(self._callmethod("__repr__"))
        except Exception:
            return repr(self)[:-1] + "; '__str__()' failed>"


def _resolve_proxytype(manager: Any, typeid: str, name: str | None) -> Callable[..., Any]:
    """The proxy type for objects of ``typeid``: the manager's, else the server's if loaded."""
    if manager is not None:
        entry = manager._registry.get(typeid)
        if entry is not None and entry[3] is not None:
            return entry[3]
    if name:
        module_name, _, qualname = name.partition(":")
        found: Any = sys.modules.get(module_name)
        for part in qualname.split("."):
            found = getattr(found, part, None)
        if callable(found):
            return found
    return AutoProxy


def RebuildProxy(func: Callable[..., Any], token: Token, serializer: str,  # noqa: N802
                 kwds: dict[str, Any]) -> Any:
    """Rebuild a pickled proxy in this process, taking the reference it needs here."""
    kwds = dict(kwds)
    adopt = kwds.pop("adopt", False)
    incref = kwds.pop("incref", True)
    reserved = kwds.pop("reserved", None)
    if kwds.pop("tls", False):
        client_side.expect_tls(token.address)
    token.address = wire.normalize_address(token.address)
    tag = client_side.tag_of(token.id)
    source = client_side.codec_context.received_from
    from_its_server = source is not None and source[0] == tag
    server = client_side.codec_context.request_server
    if server is not None and server.tag == tag:
        # Inside the server: the server holds the object for this proxy directly.
        proxy = func(Token(token.typeid, server.address, token.id), serializer,
                     incref=incref, manager_owned=True, **kwds)
        if adopt and from_its_server:
            source[2].release(token.id)  # type: ignore[index]
        return proxy
    if from_its_server:
        token.address = source[1]  # type: ignore[index] # the address as this process knows it
        if adopt and incref:
            incref = ADOPT
    if reserved is not None and incref and incref is not ADOPT:
        with adopting(token.id, reserved):
            return func(token, serializer, incref=incref, **kwds)
    return func(token, serializer, incref=incref, **kwds)


def _forwarder(name: str) -> Callable[..., Any]:
    def forward(self: BaseProxy, /, *args: Any, **kwds: Any) -> Any:
        return self._callmethod(name, args, kwds)

    forward.__name__ = forward.__qualname__ = name
    forward.__doc__ = f"Call {name}() on the shared object."
    return forward


def MakeProxyType(name: str, exposed: Any,  # noqa: N802 - the standard library's name
                  _cache: dict[tuple[str, tuple[str, ...]], type] = {}) -> type:  # noqa: B006
    """Return a proxy class (cached) with one forwarding method per name in ``exposed``."""
    exposed = tuple(exposed)
    cls = _cache.get((name, exposed))
    if cls is None:
        namespace: dict[str, Any] = {method: _forwarder(method) for method in exposed}
        namespace["_exposed_"] = exposed
        namespace["__module__"] = __name__
        cls = type(name, (BaseProxy,), namespace)
        _cache[(name, exposed)] = cls
    return cls


def AutoProxy(token: Token, serializer: str, manager: Any = None,  # noqa: N802
              authkey: bytes | None = None, exposed: Any = None, incref: Any = True,
              manager_owned: bool = False) -> BaseProxy:
    """Return a proxy whose methods are the shared object's exposed ones (asked if unknown)."""
    if exposed is None:
        key = authkey if authkey is not None else (manager._authkey if manager else None)
        exposed = client_side.client_for(token.address, key, serializer).request(
            "methods", token.id)
    proxytype = MakeProxyType(f"AutoProxy[{token.typeid}]", exposed)
    proxy = proxytype(token, serializer, manager=manager, authkey=authkey, incref=incref,
                      manager_owned=manager_owned)
    proxy._isauto = True
    return proxy


def _take_references_after_fork() -> None:
    """In a forked child: take a reference for every inherited proxy, one request per manager."""
    groups: dict[tuple[Any, str], list[BaseProxy]] = collections.defaultdict(list)
    for proxy in list(_live):
        if proxy._holds_ref:
            groups[(proxy._token.address, proxy._serializer)].append(proxy)
    for (address, serializer), proxies in groups.items():
        try:
            client = client_side.client_for(address, proxies[0]._authkey, serializer)
            missing = set(client.request("incref", [p._id for p in proxies]))
        except Exception as exc:
            util.info("could not take references to %s's objects after fork: %s", address, exc)
            missing = {p._id for p in proxies}
        for proxy in proxies:
            if proxy._id in missing:
                proxy._holds_ref = False


client_side.add_fork_hook(_take_references_after_fork)


# --------------------------------------------------------------------------- proxy types


_generic_alias: Any = classmethod(types.GenericAlias)  # ProxyType[int] in annotations


class IteratorProxy(BaseProxy):
    """Proxy of an iterator or generator held by the server."""

    _exposed_ = ("__next__", "send", "throw", "close")

    def __iter__(self) -> IteratorProxy:
        return self

    def __next__(self, *args: Any) -> Any:
        return self._callmethod("__next__", args)

    def send(self, *args: Any) -> Any:
        return self._callmethod("send", args)

    def throw(self, *args: Any) -> Any:
        return self._callmethod("throw", args)

    def close(self, *args: Any) -> Any:
        return self._callmethod("close", args)


class AcquirerProxy(BaseProxy):
    """Proxy of a lock or semaphore: acquire/release, and a context manager."""

    _exposed_: tuple[str, ...] = ("acquire", "release", "locked")

    def acquire(self, blocking: bool = True, timeout: float | None = None) -> bool:
        if timeout is None:
            return self._callmethod("acquire", (blocking,))
        return self._callmethod("acquire", (blocking, timeout))

    def release(self) -> None:
        self._callmethod("release")

    def locked(self) -> bool:
        """True if the lock is held (by anyone)."""
        return self._callmethod("locked")

    def __enter__(self) -> bool:
        return self._callmethod("acquire")

    def __exit__(self, *exc_info: Any) -> None:
        self._callmethod("release")


class ConditionProxy(AcquirerProxy):
    """Proxy of a condition variable."""

    _exposed_ = ("acquire", "release", "locked", "wait", "notify", "notify_all")

    def wait(self, timeout: float | None = None) -> bool:
        return self._callmethod("wait", (timeout,))

    def notify(self, n: int = 1) -> None:
        self._callmethod("notify", (n,))

    def notify_all(self) -> None:
        self._callmethod("notify_all")

    def wait_for(self, predicate: Callable[[], Any], timeout: float | None = None) -> Any:
        """Wait until ``predicate()`` is true (evaluated here) or ``timeout`` seconds pass."""
        return util.wait_for_predicate(self.wait, predicate, timeout)


class EventProxy(BaseProxy):
    """Proxy of an event."""

    _exposed_ = ("is_set", "set", "clear", "wait")

    def is_set(self) -> bool:
        return self._callmethod("is_set")

    def set(self) -> None:
        self._callmethod("set")

    def clear(self) -> None:
        self._callmethod("clear")

    def wait(self, timeout: float | None = None) -> bool:
        return self._callmethod("wait", (timeout,))


class BarrierProxy(BaseProxy):
    """Proxy of a barrier."""

    _exposed_ = ("__getattribute__", "wait", "abort", "reset")

    def wait(self, timeout: float | None = None) -> int:
        return self._callmethod("wait", (timeout,))

    def abort(self) -> None:
        self._callmethod("abort")

    def reset(self) -> None:
        self._callmethod("reset")

    def _attribute(self, name: str) -> Any:
        return self._callmethod("__getattribute__", (name,))

    parties = property(lambda self: self._attribute("parties"),
                       doc="The number of threads required to pass the barrier.")
    n_waiting = property(lambda self: self._attribute("n_waiting"),
                         doc="The number of threads waiting at the barrier.")
    broken = property(lambda self: self._attribute("broken"),
                      doc="True if the barrier is broken.")


class NamespaceProxy(BaseProxy):
    """Proxy of a :class:`~manyproc.managers.Namespace`: attributes live in the server.

    Names starting with an underscore belong to the proxy itself.
    """

    _exposed_ = ("__getattribute__", "__setattr__", "__delattr__")

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            return object.__getattribute__(self, name)
        return object.__getattribute__(self, "_callmethod")("__getattribute__", (name,))

    def __setattr__(self, name: str, value: Any) -> None:
        if name.startswith("_"):
            object.__setattr__(self, name, value)
        else:
            object.__getattribute__(self, "_callmethod")("__setattr__", (name, value))

    def __delattr__(self, name: str) -> None:
        if name.startswith("_"):
            object.__delattr__(self, name)
        else:
            object.__getattribute__(self, "_callmethod")("__delattr__", (name,))


class ValueProxy(BaseProxy):
    """Proxy of a :class:`~manyproc.managers.Value`: ``get()``, ``set()`` and ``.value``."""

    _exposed_ = ("get", "set")

    def get(self) -> Any:
        return self._callmethod("get")

    def set(self, value: Any) -> None:
        self._callmethod("set", (value,))

    value = property(get, set, doc="The shared value.")

    __class_getitem__ = _generic_alias


BaseListProxy = MakeProxyType("BaseListProxy", (
    "__add__", "__contains__", "__delitem__", "__getitem__", "__imul__", "__len__",
    "__mul__", "__reversed__", "__rmul__", "__setitem__", "append", "clear", "copy", "count",
    "extend", "index", "insert", "pop", "remove", "reverse", "sort",
))


class ListProxy(BaseListProxy):  # type: ignore[valid-type, misc]
    """Proxy of a list; ``+=`` and ``*=`` change the shared list in place."""

    def __iadd__(self, other: Any) -> ListProxy:
        self._callmethod("extend", (other,))
        return self

    def __imul__(self, n: Any) -> ListProxy:
        self._callmethod("__imul__", (n,))
        return self

    __class_getitem__ = _generic_alias


collections.abc.MutableSequence.register(BaseListProxy)

_BaseDictProxy = MakeProxyType("_BaseDictProxy", (
    "__contains__", "__delitem__", "__getitem__", "__ior__", "__iter__", "__len__", "__or__",
    "__reversed__", "__ror__", "__setitem__", "clear", "copy", "fromkeys", "get", "items",
    "keys", "pop", "popitem", "setdefault", "update", "values",
))
_BaseDictProxy._method_to_typeid_ = {"__iter__": "Iterator"}  # type: ignore[attr-defined]


class DictProxy(_BaseDictProxy):  # type: ignore[valid-type, misc]
    """Proxy of a dict; iterating it iterates the shared dict in the server."""

    def __ior__(self, other: Any) -> DictProxy:
        self._callmethod("__ior__", (other,))
        return self

    __class_getitem__ = _generic_alias


collections.abc.MutableMapping.register(_BaseDictProxy)

_BaseSetProxy = MakeProxyType("_BaseSetProxy", (
    "__and__", "__contains__", "__ge__", "__gt__", "__iand__", "__ior__", "__isub__",
    "__iter__", "__ixor__", "__le__", "__len__", "__lt__", "__or__", "__rand__", "__ror__",
    "__rsub__", "__rxor__", "__sub__", "__xor__", "add", "clear", "copy", "difference",
    "difference_update", "discard", "intersection", "intersection_update", "isdisjoint",
    "issubset", "issuperset", "pop", "remove", "symmetric_difference",
    "symmetric_difference_update", "union", "update",
))
_BaseSetProxy._method_to_typeid_ = {"__iter__": "Iterator"}  # type: ignore[attr-defined]


class SetProxy(_BaseSetProxy):  # type: ignore[valid-type, misc]
    """Proxy of a set; the in-place operators change the shared set."""

    def _in_place(self, method: str, other: Any) -> SetProxy:
        self._callmethod(method, (other,))
        return self

    def __ior__(self, other: Any) -> SetProxy:
        return self._in_place("__ior__", other)

    def __iand__(self, other: Any) -> SetProxy:
        return self._in_place("__iand__", other)

    def __ixor__(self, other: Any) -> SetProxy:
        return self._in_place("__ixor__", other)

    def __isub__(self, other: Any) -> SetProxy:
        return self._in_place("__isub__", other)

    __class_getitem__ = _generic_alias


collections.abc.MutableSet.register(_BaseSetProxy)

ArrayProxy = MakeProxyType("ArrayProxy", ("__len__", "__getitem__", "__setitem__"))

_BasePoolProxy = MakeProxyType("PoolProxy", (
    "apply", "apply_async", "close", "imap", "imap_unordered", "join", "map", "map_async",
    "starmap", "starmap_async", "terminate",
))
_BasePoolProxy._method_to_typeid_ = {  # type: ignore[attr-defined]
    "apply_async": "AsyncResult",
    "map_async": "AsyncResult",
    "starmap_async": "AsyncResult",
    "imap": "Iterator",
    "imap_unordered": "Iterator",
}
BasePoolProxy = _BasePoolProxy


class PoolProxy(_BasePoolProxy):  # type: ignore[valid-type, misc]
    """Proxy of a worker pool in the server; leaving a ``with`` block terminates it."""

    def __enter__(self) -> PoolProxy:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.terminate()
