"""Which external programs a tool may run.

A tool setting such as ``tools.ocr.tesseract_cmd`` can come from a checkpoint's embedded config
or a shared experiment file, not only from the person running the command; a program named
there would run with that person's rights. So a setting may name only

- a program on the tool's allow-list of known names (``tesseract``), found through ``PATH``
  (or its path, when that is where ``PATH`` finds it), or
- a program the user lists explicitly in ``$MMBRIDGE_ALLOW_EXECUTABLES`` (paths separated by
  ``os.pathsep``, e.g. ``MMBRIDGE_ALLOW_EXECUTABLES=/opt/tess/bin/tesseract:/usr/local/bin/x``).

Anything else is refused with a :class:`~mmbridge.errors.ConfigError` naming the config key,
the program and the allow-list, before anything runs.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence

from mmbridge.errors import ConfigError

#: Environment variable listing extra executables a tool setting may name.
ALLOW_ENV = "MMBRIDGE_ALLOW_EXECUTABLES"


def _real(path: str) -> str:
    return os.path.normcase(os.path.realpath(path))


def user_allowed() -> list[str]:
    """The executables listed in ``$MMBRIDGE_ALLOW_EXECUTABLES`` (real paths)."""
    return [_real(p) for p in os.environ.get(ALLOW_ENV, "").split(os.pathsep) if p.strip()]


def resolve_executable(value: str, key: str, known: Sequence[str]) -> str | None:
    """The path of the program ``value`` names, if a tool setting may run it.

    Args:
        value: The setting: a program name looked up in ``PATH``, or a path.
        key: The config key it came from (named in the error).
        known: Program names the tool expects (its allow-list), e.g. ``("tesseract",)``.

    Returns:
        The program's path, or ``None`` when ``value`` is a known name that is not installed
        (the tool decides what that means).

    Raises:
        ConfigError: ``value`` is neither a known program found through ``PATH`` nor listed in
            ``$MMBRIDGE_ALLOW_EXECUTABLES``.
    """
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{key}: {value!r} must name a program, e.g. {', '.join(known)}")
    if value in known:  # a bare known name: whatever PATH finds
        return shutil.which(value)
    found = shutil.which(value)
    allowed = set(user_allowed())
    allowed.update(_real(p) for p in map(shutil.which, known) if p)
    if found is not None and _real(found) in allowed:
        return found
    state = f"resolves to {found}" if found else "not found"
    raise ConfigError(
        f"{key}: refusing to run {value!r} ({state}): a tool setting may name only a known "
        f"program found through PATH ({', '.join(known)}) or one listed in ${ALLOW_ENV} "
        f"(currently: {os.environ.get(ALLOW_ENV) or 'unset'}); settings can come from a "
        f"checkpoint's config, so other programs never run. To allow it, run with "
        f"{ALLOW_ENV}={found or value}"
    )
