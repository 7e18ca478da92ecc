"""Shared fixtures. Tests never reach a hub: HF_HUB_OFFLINE=1 is forced here too.

Layout: ``unit/`` (one module or function, tiny models, pinned values), ``contract/`` (every
registered component against its contract; plugins and the registry), ``config/`` (the Hydra
tree, validation, sweeps), ``e2e/`` (the real CLI and Python API end to end). ``-m "not slow"``
is the one-minute inner loop; CI runs everything.

The suite runs on two pytest-xdist workers (``-n auto --maxprocesses=2 --dist loadscope`` in
pyproject's addopts); one test file, ``-n 0`` or ``--pdb`` run in one process. Each worker,
and every command a test starts from it, uses one torch thread: two workers on two cores
already fill the machine, and tiny matrices are faster on one thread anyway. How tests are
shared out is in :func:`pytest_collection_modifyitems` below."""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
WORKER = os.environ.get("PYTEST_XDIST_WORKER")
if WORKER:  # before torch is imported: its thread pool (and each child's) reads these
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_var, "1")

#: Where the workers write ``{node id: work unit}`` for the main process's scheduler.
UNITS = pytest.StashKey[Path]()
UNITS_INPUT = "mmbridge_units_file"
#: Module- or class-scoped fixtures too cheap to keep a module on one worker for.
CHEAP_SHARED = frozenset({"one_thread"})
#: ``{"modules": [each test module measured], "tests": {node id: seconds}}``: what each test
#: took (setup + call + teardown; only those >= MIN_STORED) in a run on the 2-core machine,
#: refreshed by ``pytest --store-durations``. Read for the heaviest-first order.
DURATIONS = Path(__file__).with_name("durations.json")
MIN_STORED = 1.0
#: Estimated seconds of a test that DURATIONS does not list: one marked slow in a module not
#: measured yet, or any other.
GUESS_SLOW, GUESS_OTHER = 30.0, 0.2


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--store-durations",
        action="store_true",
        help=f"write each test's duration (>= {MIN_STORED:g} s) to {DURATIONS.name}, "
        "which orders the xdist work units (tests/conftest.py)",
    )


def pytest_configure(config: pytest.Config) -> None:
    if WORKER and "torch" in sys.modules:  # a plugin imported torch before the env was set
        sys.modules["torch"].set_num_threads(1)
    if config.getoption("store_durations") and not WORKER:
        config.pluginmanager.register(_DurationStore(), "mmbridge-duration-store")


class _DurationStore:
    """Sums each test's phases as their reports reach the main process (from the workers
    under xdist) and, at the end, replaces the entries of the tests that ran in
    :data:`DURATIONS` (a test now under MIN_STORED loses its entry)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self.seconds[report.nodeid] = self.seconds.get(report.nodeid, 0.0) + report.duration

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        old = json.loads(DURATIONS.read_text()) if DURATIONS.is_file() else {}
        tests = {k: v for k, v in old.get("tests", {}).items() if k not in self.seconds}
        tests.update({k: round(v, 1) for k, v in self.seconds.items() if v >= MIN_STORED})
        modules = sorted({k.split("::")[0] for k in self.seconds} | set(old.get("modules", [])))
        DURATIONS.write_text(
            json.dumps({"modules": modules, "tests": dict(sorted(tests.items()))}, indent=0) + "\n"
        )


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config: pytest.Config) -> int | None:
    """``-n auto`` on one test file (or tests in one file): no workers, the tests run in this
    process (starting two workers costs more than it saves there). Otherwise xdist decides."""
    files = {str(arg).split("::")[0] for arg in config.args}
    if len(files) == 1 and Path(next(iter(files))).is_file():
        return 0
    return None


def _shares_fixture(item: pytest.Item) -> bool:
    """Whether the test uses a module-, class- or package-scoped fixture worth sharing."""
    info = getattr(item, "_fixtureinfo", None)
    if info is None:
        return False
    return any(
        defs[-1].scope in ("module", "class", "package") and name not in CHEAP_SHARED
        for name, defs in info.name2fixturedefs.items()
        if defs
    )


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: Any) -> None:
    """Main process, per xdist worker: the file the workers write the work units to."""
    if UNITS not in node.config.stash:
        node.config.stash[UNITS] = Path(tempfile.mkdtemp(prefix="mmbridge-xdist-")) / "units.json"
    node.workerinput[UNITS_INPUT] = str(node.config.stash[UNITS])


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """Main process, ``--dist loadscope``: xdist's scope scheduling over the work units the
    workers wrote (:func:`pytest_collection_modifyitems`) instead of over modules. (xdist's own
    ``loadgroup`` cannot be used: it renames items through ``_nodeid``, which pytest 9 ignores.)"""
    if config.getvalue("dist") != "loadscope" or UNITS not in config.stash:
        return None
    from xdist.scheduler import LoadScopeScheduling

    path: Path = config.stash[UNITS]

    class UnitScheduling(LoadScopeScheduling):
        units: dict[str, str] | None = None

        def _split_scope(self, nodeid: str) -> str:
            if self.units is None:  # called once every worker has collected (and written)
                self.units = json.loads(path.read_text()) if path.is_file() else {}
            return self.units.get(nodeid, nodeid)

    return UnitScheduling(config, log)


def pytest_unconfigure(config: pytest.Config) -> None:
    if UNITS in config.stash:
        shutil.rmtree(config.stash[UNITS].parent, ignore_errors=True)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """On an xdist worker under ``--dist loadscope``: share the tests out in work units, longest
    first.

    A module whose tests share a module-scoped fixture (a trained run, an exported bundle) is
    one unit, so the fixture is built once; tests with the same ``xdist_group`` mark are one
    unit; every other test is a unit of its own. The collection is ordered by the unit's
    estimated seconds (:data:`DURATIONS`, else a guess from the ``slow`` mark), the longest
    first: xdist hands units out in collection order (``--no-loadscope-reorder``), and a long
    unit started last would leave the other worker idle. Tests keep their order within a unit;
    every worker computes the same order (xdist checks that) and writes the same
    ``{node id: unit}`` file for :func:`pytest_xdist_make_scheduler`."""
    target = getattr(config, "workerinput", {}).get(UNITS_INPUT)
    if not (WORKER and target):
        return
    stored = json.loads(DURATIONS.read_text()) if DURATIONS.is_file() else {}
    known: dict[str, float] = stored.get("tests", {})
    measured = set(stored.get("modules", []))

    def guess(item: pytest.Item) -> float:
        new = item.nodeid.split("::")[0] not in measured
        return GUESS_SLOW if new and item.get_closest_marker("slow") else GUESS_OTHER

    units: dict[str, list[pytest.Item]] = {}
    for item in items:
        mark = item.get_closest_marker("xdist_group")
        if mark:
            key = "group:" + str(mark.args[0] if mark.args else mark.kwargs.get("name", "default"))
        else:
            key = item.nodeid.split("::")[0] if _shares_fixture(item) else item.nodeid
        units.setdefault(key, []).append(item)
    ordered = sorted(
        (
            (-sum(known.get(m.nodeid) or guess(m) for m in members), n, members)
            for n, members in enumerate(units.values())
        ),
        key=lambda u: u[:2],
    )
    items[:] = [m for *_, members in ordered for m in members]
    mine = Path(f"{target}.{WORKER}")
    mine.write_text(json.dumps({m.nodeid: key for key, members in units.items() for m in members}))
    os.replace(mine, target)


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
