"""The package map of docs/concepts/architecture.md (mmbridge.docs.packages) is read from the
source: every package of core/ is in it, with its docstring, and in layer order."""

from __future__ import annotations

from pathlib import Path

from mmbridge.docs.packages import packages_markdown, units

CORE = Path(__file__).resolve().parents[2] / "core"


def test_every_package_and_root_module_is_in_the_map_in_layer_order() -> None:
    table = packages_markdown(CORE).splitlines()[2:]
    names = [row.split("`")[1].removesuffix("/").removesuffix(".py") for row in table]
    packages = {p.name for p in CORE.iterdir() if (p / "__init__.py").exists()}
    modules = {p.stem for p in CORE.glob("*.py") if p.name != "__init__.py"}
    assert set(names) == packages | modules
    found = units(CORE)
    for i, name in enumerate(names):
        doc, deps = found[name]
        assert doc, f"{name} has no docstring"
        assert deps <= set(names[:i]), f"{name} is listed before what it imports"
    assert names.index("contracts") < names.index("registry") < names.index("config")
    assert names.index("training") < names.index("runtime")


def test_type_checking_imports_do_not_count_and_local_ones_do(tmp_path: Path) -> None:
    for pkg in ("low", "high"):
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "__init__.py").write_text(f'"""The {pkg} layer.\n\nMore."""\n')
    (tmp_path / "low" / "a.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from mmbridge.high import x\n"
    )
    (tmp_path / "high" / "b.py").write_text("def f():\n    from mmbridge.low import a\n")
    assert units(tmp_path) == {
        "low": ("The low layer.", set()),
        "high": ("The high layer.", {"low"}),
    }
    rows = packages_markdown(tmp_path).splitlines()[2:]
    assert [r.split("`")[1] for r in rows] == ["low/", "high/"]
