"""Every domain error of mmbridge, in one place.

Each error message names the culprit (plugin, config key, file) and, where there is a choice,
the valid options. Users catch :class:`MMBridgeError` to handle all of them.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


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


class ToolError(MMBridgeError):
    """A tool call failed; the text is what the model gets to read."""


def did_you_mean(name: str, options: Iterable[str]) -> str:
    """Return ``" (did you mean 'x'?)"`` for the closest option, or ``""``."""
    close = difflib.get_close_matches(name, list(options), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def unknown(kind: str, name: str, options: Iterable[str], group: str | None = None) -> UnknownComponentError:
    """Build the standard "unknown X" error: names the value, the config group and the options."""
    opts = sorted(options)
    where = f" (conf group: {group})" if group else ""
    listed = ", ".join(opts) if opts else "(none registered)"
    return UnknownComponentError(
        f"unknown {kind} '{name}'{where}{did_you_mean(name, opts)}; available: {listed}"
    )
