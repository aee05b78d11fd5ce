"""Exceptions that come back from workers, and how they are rebuilt in the parent.

A task's exception travels as itself whenever it can: same type, same args, with the
worker's formatted traceback attached as its ``__cause__`` (a :class:`RemoteTraceback`,
whose ``str`` is that traceback) and a note naming the worker and the task. When it
cannot (it does not pickle, or its constructor cannot be called again), a
:class:`RemoteTaskError` carries its type name, text and traceback instead. A result
that cannot be pickled fails its item with :class:`MaybeEncodingError`::

    Exception
    ├── RemoteTraceback        the worker's traceback, as the __cause__ of what is raised
    └── ProcessError
        ├── RemoteTaskError    the task's exception could not travel: its text does
        └── MaybeEncodingError the task's result could not be pickled
"""

from __future__ import annotations

import pickle
from typing import Any

from manyproc._errors import ProcessError

from .worker import ERR_ENCODING, ERR_PICKLED, STOPPING_REASON

__all__ = ["RemoteTraceback", "RemoteTaskError", "MaybeEncodingError", "rebuild_error",
           "add_note"]


class RemoteTraceback(Exception):
    """The traceback of an exception raised in a worker; ``str()`` gives it whole.

    Attributes:
        tb: the formatted traceback, as the worker printed it.
    """

    def __init__(self, tb: str) -> None:
        self.tb = tb
        super().__init__(tb)

    def __str__(self) -> str:
        return f'\n"""\n{self.tb}"""'

    def __reduce__(self) -> Any:
        return type(self), (self.tb,)


_STOPPING_ADVICE = ("a task cannot end its worker this way (sys.exit() in a task only fails "
                    "the task); raise an Exception subclass to fail it")


class RemoteTaskError(ProcessError):
    """A task raised an exception that could not be sent back as itself.

    Attributes:
        type_name: the qualified name of the original exception's type.
        message: ``str()`` of the original exception.
        traceback_text: the worker's formatted traceback.
        reason: why the original could not travel.
    """

    def __init__(self, type_name: str, message: str = "", traceback_text: str = "",
                 reason: str = "") -> None:
        self.type_name = type_name
        self.message = message
        self.traceback_text = traceback_text
        self.reason = reason
        text = f"{type_name}: {message}" if message else type_name
        if reason:
            advice = (_STOPPING_ADVICE if reason.startswith(STOPPING_REASON) else
                      "make the exception picklable, e.g. pass every constructor argument to "
                      "super().__init__()")
            text += f" [the worker's exception is shown as text: {reason}; {advice}]"
        super().__init__(text)

    def __reduce__(self) -> Any:
        return type(self), (self.type_name, self.message, self.traceback_text, self.reason)


class MaybeEncodingError(ProcessError):
    """A task's result could not be pickled to be sent back to the parent.

    Attributes:
        exc: ``repr`` of the pickling error.
        value: ``repr`` of the result (shortened).
    """

    def __init__(self, exc: Any, value: Any) -> None:
        self.exc = repr(exc) if not isinstance(exc, str) else exc
        self.value = repr(value) if not isinstance(value, str) else value
        super().__init__(self.exc, self.value)

    def __str__(self) -> str:
        return (f"Error sending result: {self.value}. Reason: {self.exc}. Return only "
                "picklable values from the function (plain data, not locks, files, sockets "
                "or generators)")

    def __repr__(self) -> str:
        return f"<{type(self).__name__}: {self}>"


def add_note(exc: BaseException, note: str) -> None:
    """Attach ``note`` to ``exc`` (``add_note`` on 3.11+; appended to a lone str arg on 3.10)."""
    adder = getattr(exc, "add_note", None)
    if adder is not None:
        try:
            adder(note)
        except Exception:  # noqa: BLE001 - a frozen exception keeps its notes to itself
            pass
        return
    args = exc.args
    if len(args) == 1 and isinstance(args[0], str) and type(exc).__str__ is BaseException.__str__:
        exc.args = (f"{args[0]}\n{note}",)


def rebuild_error(payload: tuple[Any, ...], note: str) -> BaseException:
    """Turn a worker's error payload (see ``worker._error_payload``) into an exception."""
    kind, blob, name, text, tb_text, _offset, reason = payload
    if kind == ERR_ENCODING:
        error: BaseException = MaybeEncodingError(text, tb_text)
        add_note(error, note)
        return error
    if kind == ERR_PICKLED:
        try:
            error = pickle.loads(blob)
            if not isinstance(error, BaseException):
                raise TypeError(f"unpickled {type(error).__name__}, not an exception")
        except Exception as why:  # noqa: BLE001 - e.g. the type exists only in the worker
            error = RemoteTaskError(name, text, tb_text,
                                    f"it could not be rebuilt in the parent ({why!r})")
    else:
        error = RemoteTaskError(name, text, tb_text, reason)
    error.__cause__ = RemoteTraceback(tb_text)
    add_note(error, note)
    return error
