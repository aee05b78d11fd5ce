"""The manager wire protocol in isolation: message shapes, serializers, errors, addresses."""

from __future__ import annotations

import pickle
import time

import pytest

from manyproc import _manager_wire as wire
from manyproc.managers import RemoteError


@pytest.mark.parametrize("message", [
    (1, "ping", ()),
    [2, "call", ["id", "append", [1], {}]],  # XML-RPC turns tuples into lists
])
def test_request_accepts_well_formed_messages(message):
    request = wire.Request.from_wire(message)
    assert request.seq == message[0]
    assert request.op == message[1]
    assert isinstance(request.args, tuple)
    assert wire.Request.from_wire(request.to_wire()) == request


@pytest.mark.parametrize("message, words", [
    ("ping", "triple"),
    ((1, "ping"), "triple"),
    ((1, "ping", (), None), "triple"),
    (("1", "ping", ()), "sequence number"),
    ((True, "ping", ()), "sequence number"),
    ((1, 7, ()), "op"),
    ((1, "ping", "args"), "tuple"),
    (None, "triple"),
])
def test_request_rejects_malformed_messages(message, words):
    with pytest.raises(wire.ProtocolError, match=words):
        wire.Request.from_wire(message)


def test_reply_rejects_unknown_status():
    with pytest.raises(wire.ProtocolError, match="status"):
        wire.Reply.from_wire((1, "maybe", None))
    assert wire.Reply.from_wire([3, "ok", 5]) == wire.Reply(3, "ok", 5)


def test_every_status_and_op_is_documented():
    assert set(wire.STATUSES) == {"ok", "proxy", "raised", "error"}
    from manyproc._manager_server import Server

    assert set(Server.ops) == set(wire.OPS)


def test_pickle_codec_round_trips_objects():
    codec = wire.get_codec("pickle")
    value = (1, "call", ("ab:1", "f", (ValueError("x"),), {"k": {1, 2}}))
    back = codec.loads(codec.dumps(value))
    assert back[2][3]["k"] == {1, 2}
    assert isinstance(back[2][2][0], ValueError)
    assert codec.carries_objects


def test_xmlrpc_codec_carries_plain_data_only():
    codec = wire.get_codec("xmlrpclib")
    value = (1, "ok", ("hello", None, True, 2.25, b"\xe5", {"a": [1, 2]}))
    back = codec.loads(codec.dumps(value))
    assert back == [1, "ok", ["hello", None, True, 2.25, b"\xe5", {"a": [1, 2]}]]
    assert not codec.carries_objects
    with pytest.raises(TypeError):
        codec.dumps((1, "ok", time.sleep))


def test_unknown_serializer_is_a_value_and_key_error_naming_the_choices():
    with pytest.raises(wire.UnknownSerializerError) as info:
        wire.get_codec("json")
    assert isinstance(info.value, ValueError) and isinstance(info.value, KeyError)
    assert "'json'" in str(info.value) and "pickle" in str(info.value)
    assert "xmlrpclib" in str(info.value)


@pytest.mark.parametrize("address, expected", [
    ("/tmp/some.sock", True),
    ("\0abstract", True),
    (("127.0.0.1", 5000), True),
    (("127.5.6.7", 5000), True),
    (("::1", 5000), True),
    (("localhost", 5000), True),
    (("", 5000), False),
    (("0.0.0.0", 5000), False),
    (("::", 5000), False),
    (("10.1.2.3", 5000), False),
    (("192.168.0.10", 5000), False),
])
def test_is_loopback(address, expected):
    assert wire.is_loopback(address) is expected


def test_format_address():
    assert wire.format_address(("127.0.0.1", 80)) == "127.0.0.1:80"
    assert wire.format_address(("", 80)) == "0.0.0.0:80"
    assert wire.format_address("/tmp/x") == "'/tmp/x'"
    assert wire.normalize_address(["h", 1]) == ("h", 1)


def test_remote_error_shows_the_server_text_between_rules():
    error = RemoteError("KeyError: 'x'\n")
    text = str(error)
    assert text.startswith("\n" + "-" * 75) and "KeyError: 'x'" in text
    assert pickle.loads(pickle.dumps(error)).args == error.args


def test_raised_reply_rebuilds_the_exception_with_the_server_traceback():
    exc = wire.raised_from_reply((KeyError("k"), "KeyError", "'k'", "Traceback: in server\n"))
    assert isinstance(exc, KeyError)
    assert isinstance(exc.__cause__, wire.RemoteTraceback)
    assert "in server" in str(exc.__cause__)


def test_raised_reply_without_the_object_becomes_a_remote_error():
    exc = wire.raised_from_reply((None, "Weird", "cannot pickle me", "Traceback: here\n"))
    assert isinstance(exc, RemoteError)
    assert "Weird: cannot pickle me" in str(exc) and "Traceback: here" in str(exc)


def test_malformed_error_replies_still_give_a_remote_error():
    assert isinstance(wire.raised_from_reply("junk"), RemoteError)
    assert isinstance(wire.error_from_reply(42), RemoteError)


def test_error_reply_keeps_its_cause():
    error = wire.error_from_reply(("creating failed", "tb text\n", ValueError("bad")))
    assert isinstance(error, RemoteError)
    assert isinstance(error.__cause__, ValueError)
    assert "creating failed" in str(error) and "tb text" in str(error)


def test_manager_connection_error_is_connection_and_eof_error():
    error = wire.ManagerConnectionError("lost the manager at 1.2.3.4:5")
    assert isinstance(error, ConnectionError) and isinstance(error, EOFError)
    assert str(error) == "lost the manager at 1.2.3.4:5"


def test_message_too_large_says_both_sizes():
    error = wire.MessageTooLarge(2000, 1000)
    assert "2000" in str(error) and "1000" in str(error)
    assert isinstance(error, OSError)
