"""``mmbridge plugins check``: run the contract kit on every registered connector and encoder
and print one table row per component."""

from __future__ import annotations

import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from mmbridge.errors import ConfigError
from mmbridge.registry import Entry, Registry
from mmbridge.testing.contracts import check_connector, check_encoder

#: Kinds the contract kit checks.
CHECKED_KINDS = ("connector", "encoder")
#: Dimensions connectors are built with; ``OUT_DIM`` is the hidden size of the test LLM.
IN_DIM, OUT_DIM = 24, 32


#: The registered LLM whose ``for_testing`` instance connectors with layers inside the LLM
#: attach to (looked up in the registry: core imports no plugin module).
TEST_LLM = "hf_causal"


class _TestLLM:
    """The tiny LLM that connectors with layers inside the LLM attach to, built on first use."""

    def __init__(self, tmp_dir: Path, registry: Registry) -> None:
        self.tmp_dir, self.registry, self._llm = tmp_dir, registry, None

    def get(self) -> Any:
        if self._llm is None:
            self._llm = self.registry.get("llm", TEST_LLM).cls.for_testing(self.tmp_dir / "llm")
        return self._llm


def check_entry(entry: Entry, tmp_dir: Path, llm: Callable[[], Any] | None = None) -> None:
    """Build ``entry`` with its ``for_testing`` and run its contract checks (raises on failure)."""
    if entry.kind == "connector":
        connector = entry.cls.for_testing(tmp_dir, in_dim=IN_DIM, out_dim=OUT_DIM)
        needs_llm = not connector.in_sequence and llm is not None
        check_connector(connector, llm=llm() if needs_llm and llm is not None else None)
    elif entry.kind == "encoder":
        check_encoder(entry.cls.for_testing(tmp_dir), tmp_dir)
    else:
        raise ConfigError(
            f"no contract checks for kind '{entry.kind}'; checked: {', '.join(CHECKED_KINDS)}"
        )


def run_contract_checks(
    registry: Registry, console: Console, kind: str | None = None, plugin: str | None = None
) -> int:
    """Check every registered connector/encoder (optionally of one ``kind`` or ``plugin``).

    Prints a table (kind, name, plugin, package, result, seconds, error) and returns 0 when
    all pass, 1 when one fails, 2 when the filters select nothing.
    """
    if kind is not None and kind not in CHECKED_KINDS:
        console.print(
            f"[yellow]the contract kit checks {', '.join(CHECKED_KINDS)}; "
            f"nothing to check for kind '{kind}'"
        )
        return 2
    entries = [
        e
        for k in ([kind] if kind else CHECKED_KINDS)
        for e in registry.entries(k)
        if plugin is None or plugin in (e.origin.plugin, e.origin.package)
    ]
    if not entries:
        plugins = sorted({e.origin.plugin for k in CHECKED_KINDS for e in registry.entries(k)})
        console.print(
            f"[red]no {kind or 'connector/encoder'} registered by plugin '{plugin}'; "
            f"plugins with checked components: {', '.join(plugins) or '(none)'}"
        )
        return 2
    table = Table(title="mmbridge contract checks")
    for col in ("kind", "name", "plugin", "package", "result", "seconds", "error"):
        table.add_column(col, overflow="fold")
    failures = 0
    with tempfile.TemporaryDirectory(prefix="mmbridge-check-") as root:
        llm = _TestLLM(Path(root), registry)
        for k, entry in enumerate(entries):
            tmp = Path(root) / f"{k:03d}-{entry.kind}-{entry.name}"
            tmp.mkdir()
            start = time.perf_counter()
            error = ""
            try:
                check_entry(entry, tmp, llm.get)
            except Exception as exc:  # a broken plugin must not stop the others' checks
                failures += 1
                error = f"{type(exc).__name__}: {exc}"
                if not isinstance(exc, AssertionError):
                    frame = traceback.extract_tb(exc.__traceback__)[-1]
                    error += f" ({Path(frame.filename).name}:{frame.lineno})"
            seconds = time.perf_counter() - start
            result = "[red]FAIL" if error else "[green]pass"
            o = entry.origin
            table.add_row(
                entry.kind,
                entry.name,
                o.plugin,
                f"{o.package} {o.version}",
                result,
                f"{seconds:.2f}",
                error,
            )
    console.print(table)
    console.print(f"{len(entries) - failures}/{len(entries)} passed")
    return 1 if failures else 0
