"""Every domain error of mmbridge, in one place.

Each error message names the culprit (plugin, config key, file) and, where there is a choice,
the valid options. Users catch :class:`MMBridgeError` to handle all of them.
"""

from __future__ import annotations

import binascii
import difflib
import errno
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from os import PathLike


class MMBridgeError(Exception):
    """Base class of every error mmbridge raises on purpose."""


class PluginError(MMBridgeError):
    """A plugin could not be loaded or registered something invalid."""


class RegistrationError(PluginError):
    """A component was registered twice or with the wrong kind."""


class UnknownComponentError(MMBridgeError, KeyError):
    """A name was looked up that no plugin registered."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class ConfigError(MMBridgeError, ValueError):
    """A composed config is invalid; the message names the key(s)."""


class AssemblyError(ConfigError):
    """Components that are valid alone do not fit together (dimensions, placeholders)."""


class DataError(MMBridgeError, ValueError):
    """A data file or sample is malformed; the message names the file and the record."""


class AssetError(MMBridgeError):
    """An offline model asset is missing or failed its conversion check."""


class CheckpointError(MMBridgeError):
    """A checkpoint is missing, unreadable or does not match the model."""


class RunLockedError(MMBridgeError):
    """A run directory is held by another live process (the message names its pid and host)."""


class RunExistsError(ConfigError):
    """A new training was pointed at a directory that holds a run (finished or started); the
    message names it and says to resume it (``resume=DIR``) or to train elsewhere."""


class StorageError(MMBridgeError, OSError):
    """An output location is not writable or has too little free space; the message names the
    path, the bytes needed and the bytes free."""


class IntegrityError(CheckpointError):
    """A file of a bundle or checkpoint does not match the checksum recorded when it was written."""


class ToolError(MMBridgeError):
    """A tool call failed; the text is what the model gets to read."""


def did_you_mean(name: str, options: Iterable[str]) -> str:
    """Return ``" (did you mean 'x'?)"`` for the closest option, or ``""``."""
    close = difflib.get_close_matches(name, list(options), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def unknown(
    kind: str, name: str, options: Iterable[str], group: str | None = None
) -> UnknownComponentError:
    """Build the standard "unknown X" error: names the value, the config group and the options."""
    opts = sorted(options)
    where = f" (conf group: {group})" if group else ""
    listed = ", ".join(opts) if opts else "(none registered)"
    return UnknownComponentError(
        f"unknown {kind} '{name}'{where}{did_you_mean(name, opts)}; available: {listed}"
    )


#: What a reader's own code raises on malformed input (binascii.Error, ArrowInvalid and
#: UnicodeDecodeError are ValueErrors); anything else is a bug and keeps its traceback.
_MALFORMED = (
    KeyError,
    IndexError,
    TypeError,
    ValueError,
    AttributeError,
    OSError,
    binascii.Error,
    RecursionError,
    OverflowError,
)


def describe_malformed(exc: BaseException) -> str:
    """``exc`` in a reader's words: a missing key, a wrong type, an undecodable value."""
    if isinstance(exc, KeyError):
        return f"missing key {exc.args[0]!r}" if exc.args else "missing key"
    if isinstance(exc, UnicodeDecodeError):
        return f"not UTF-8 ({exc.reason} at byte {exc.start})"
    if isinstance(exc, IndexError):
        return f"index out of range ({exc})"
    if isinstance(exc, binascii.Error):
        return f"invalid base64 ({exc})"
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
    return f"{type(exc).__name__}: {exc}"


@contextmanager
def reading(
    file: str | PathLike | Iterable[str | PathLike],
    record: object = None,
    expected: str = "",
    also: tuple[type[Exception], ...] = (),
    error: type[MMBridgeError] = DataError,
) -> Iterator[None]:
    """The error boundary of a reader or loader: a malformed input inside it (missing key,
    wrong type, bad encoding, unreadable file) becomes one error (``error``) naming the file,
    the record and what was expected; mmbridge's own errors pass unchanged.

    Args:
        file: The file (or files) being read.
        record: The record being read (``"question 42"``, ``"line 7"``), if any.
        expected: What a valid input looks like, appended to the message.
        also: Further exception types that mean malformed input here (a library's own errors).
        error: The class raised (:class:`DataError`; a loader of checkpoints and bundles
            raises :class:`CheckpointError`).
    """
    caught: tuple[type[BaseException], ...] = (*_MALFORMED, *also)
    try:
        yield
    except MMBridgeError:
        raise
    except caught as exc:
        if isinstance(exc, OSError) and exc.errno in (
            errno.ENOSPC,
            errno.EDQUOT,
        ):  # not the input's fault
            raise StorageError(f"{exc.filename or file}: disk full ({exc.strerror})") from exc
        files = [file] if isinstance(file, str | PathLike) else list(file)
        where = ", ".join(str(f) for f in files)
        if record is not None:
            where += f": {record}"
        hint = f" (expected {expected})" if expected else ""
        what = " ".join(describe_malformed(exc).split())[:500]  # one line, bounded
        raise error(f"{where}: {what}{hint}") from exc
