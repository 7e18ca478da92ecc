"""Shared fixtures. Tests never reach a hub: HF_HUB_OFFLINE=1 is forced here too.

Layout: ``unit/`` (one module or function, tiny models, pinned values), ``contract/`` (every
registered component against its contract; plugins and the registry), ``config/`` (the Hydra
tree, validation, sweeps), ``e2e/`` (the real CLI and Python API end to end). ``-m "not slow"``
is the one-minute inner loop; CI runs everything."""

from __future__ import annotations

import os
import sys
import textwrap
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")



@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices: one thread is faster, and far faster on a busy CPU (no pool waits). Use
    with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def fake_dist(tmp_path, monkeypatch):
    """Make an installed distribution (a real ``*.dist-info`` with an ``mmbridge`` entry point)
    on a temporary sys.path entry. Returns ``make(dist, module_source, ep_name=...)``."""

    def make(dist: str, module: str, source: str, ep_name: str | None = None) -> Path:
        root = tmp_path / "site"
        root.mkdir(exist_ok=True)
        (root / f"{module}.py").write_text(textwrap.dedent(source))
        info = root / f"{dist}-0.1.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
        (info / "entry_points.txt").write_text(f"[mmbridge]\n{ep_name or dist} = {module}\n")
        if str(root) not in sys.path:
            monkeypatch.syspath_prepend(str(root))
        import importlib

        importlib.invalidate_caches()
        return root

    return make
