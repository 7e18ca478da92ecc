"""The documentation site: built with warnings as errors, and every code block of it (and of
README.md) run.

A fenced block's info string decides what happens to it:

- ``python``: executed; the blocks of one page share a namespace, in order, like a notebook;
- ``bash``: each line runs; ``mmbridge ...`` in this process (``mmbridge.cli.main``), ``X=value``
  sets a variable; anything else must be marked not-run. A ``mmbridge train`` line sets ``$RUN``
  to the run directory it made, for the lines after it;
- ``yaml`` / ``toml`` / ``json``: parsed;
- ``text`` or no language: output, a tree or a diagram, not code;
- ``{ .LANG .norun data-reason="..." }``: not run, for the reason given (an 8-GPU job, a
  13-minute run); a reason is required. In README.md, which GitHub renders, the same flag is a
  comment on the line above the block: ``<!-- norun: REASON -->``;
- ``{ .LANG .excerpt data-file="PATH" }``: an excerpt of a file in the repository, which must
  hold each of its lines, in the same order (lines may be left out between them).

Training stays small: ``mmbridge train|sweep|inspect`` lines and ``mmbridge.train`` calls run with
:data:`SMALL` added (one step per stage, four test questions, eight training samples of a
generated data set; a key the docs set themselves is left as written), and such a line must
choose an experiment of the tiny models (:data:`TINY`): the documented command runs through the
real CLI, only shorter.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from helpers import shared_registry

import mmbridge
from mmbridge import cli
from mmbridge.docs.generate import FAMILIES

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
PAGES = [*sorted(p.relative_to(ROOT).as_posix() for p in DOCS.rglob("*.md")), "README.md"]

#: Added to every documented training (a key the line sets itself is kept as written).
SMALL = [
    "evaluation.max_samples=4",
    "evaluation.val_samples=2",
    "evaluation.batch_size=4",
    "trainer.enable_progress_bar=false",
    "stages.align.batch_size=4",
    "stages.align.max_steps=1",
    "stages.align.val_every=1",
    "stages.instruct.batch_size=4",
    "stages.instruct.max_steps=1",
    "stages.instruct.val_every=1",
]
#: Added too when the line keeps the experiment's generated data set.
SMALL_DATA = ["data.n_train=8", "data.n_val=4", "data.n_test=4"]
LANGS = {"python", "bash", "yaml", "toml", "json", "text", ""}
#: The experiments of the tiny random models, which a documented training must choose.
TINY = {"experiment=tiny", "experiment=aligngpt"}

pytestmark = pytest.mark.usefixtures("one_thread")


@dataclass
class Block:
    page: str
    line: int
    lang: str
    code: str
    flags: set[str] = field(default_factory=set)
    attrs: dict[str, str] = field(default_factory=dict)

    def where(self) -> str:
        return f"{self.page}:{self.line}"


_FENCE = re.compile(r"^(\s*)(`{3,})\s*(.*)$")
_NORUN_COMMENT = re.compile(r"<!--\s*norun:\s*(.*?)\s*-->")


def blocks(page: str) -> list[Block]:
    """The fenced code blocks of a Markdown file, with their info-string flags."""
    lines = (ROOT / page).read_text(encoding="utf-8").splitlines()
    found, i = [], 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, ticks, info = m.groups()
        end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == ticks)
        code = textwrap.dedent("\n".join(lines[i + 1 : end])) + "\n"
        before = next((line.strip() for line in reversed(lines[:i]) if line.strip()), "")
        comment = _NORUN_COMMENT.fullmatch(before)
        if info.startswith("{"):
            classes = re.findall(r"(?<![\w-])\.([\w-]+)", info)
            attrs = dict(re.findall(r'([\w-]+)="([^"]*)"', info))
            found.append(
                Block(page, i + 1, classes[0] if classes else "", code, set(classes[1:]), attrs)
            )
        elif comment:  # GitHub shows the README: there the flag is a comment above the block
            found.append(
                Block(
                    page,
                    i + 1,
                    info.split()[0] if info else "",
                    code,
                    {"norun"},
                    {"data-reason": comment.group(1)},
                )
            )
        else:
            found.append(Block(page, i + 1, info.split()[0] if info else "", code))
        i = end + 1
    return found


def _with_small(args: list[str]) -> list[str]:
    keys = {a.split("=", 1)[0].lstrip("+") for a in args if "=" in a}
    extra = [*SMALL, *([] if "data" in keys else SMALL_DATA)]
    return [*args, *(a for a in extra if a.split("=", 1)[0] not in keys)]


def _newest_run(outputs: Path) -> Path:
    runs = [m.parent for m in outputs.glob("*/*/metrics.json")]
    return max(runs, key=lambda p: p.stat().st_mtime)


def run_shell(block: Block, cwd: Path, setenv: Callable[[str, str], None]) -> None:
    """Each line of a ``bash`` block: ``mmbridge ...`` through the CLI in this process."""
    text = block.code.replace("\\\n", " ")
    for line in text.splitlines():
        words = shlex.split(os.path.expandvars(line), comments=True)
        if not words:
            continue
        unset = re.findall(r"\$\{?(\w+)", " ".join(words))
        assert not unset, (
            f"{block.where()}: ${unset[0]} is not set here (a page sets $RUN by training first)"
        )
        if len(words) == 1 and re.fullmatch(r"[A-Z_]+=\S*", words[0]):
            name, value = words[0].split("=", 1)
            setenv(name, value)
            continue
        assert words[0] == "mmbridge", (
            f"{block.where()}: `{line.strip()}` is not a mmbridge command; mark the block "
            '{ .bash .norun data-reason="..." } if it cannot run in the test suite'
        )
        args = words[1:]
        if args and args[0] in ("train", "sweep", "inspect"):
            assert TINY & set(args), (
                f"{block.where()}: a documented training must choose one of {sorted(TINY)}"
            )
            args = [args[0], *_with_small(args[1:])]
        code = cli.main(args)
        assert code == 0, f"{block.where()}: `{line.strip()}` exited {code}"
        if args[0] == "train":
            setenv("RUN", str(_newest_run(cwd / "outputs")))


def excerpt_missing(excerpt: str, source: str) -> str | None:
    """The first line of ``excerpt`` not found in ``source`` in order (lines may be left out
    between them, e.g. docstrings; a lone ``...`` stands for left-out lines), or None."""
    lines = iter(line.rstrip() for line in source.splitlines())
    for line in excerpt.splitlines():
        head = line.split("...", 1)[0].rstrip() if "..." in line else None
        if not line.strip() or (head is not None and not head.strip()):
            continue  # a blank line, or "..." (with a comment) for left-out lines
        # a line cut short with "..." (an elided body or string) matches the line it starts
        if not any(c.startswith(head) if head else c == line.rstrip() for c in lines):
            return line
    return None


def check_block(
    block: Block,
    namespace: dict,
    cwd: Path,
    setenv: Callable[[str, str], None] = os.environ.__setitem__,
) -> None:
    assert block.lang in LANGS, (
        f"{block.where()}: unknown language {block.lang!r} (one of {sorted(LANGS)})"
    )
    if "norun" in block.flags:
        assert block.attrs.get("data-reason", "").strip(), (
            f"{block.where()}: a norun block needs data-reason"
        )
        return
    if "excerpt" in block.flags:
        missing = excerpt_missing(
            block.code, (ROOT / block.attrs["data-file"]).read_text(encoding="utf-8")
        )
        assert missing is None, (
            f"{block.where()}: line {missing!r} is not in {block.attrs['data-file']} (in order)"
        )
        return
    if block.lang == "python":
        exec(compile(block.code, block.where(), "exec"), namespace)
    elif block.lang == "bash":
        run_shell(block, cwd, setenv)
    elif block.lang == "yaml":
        yaml.safe_load(block.code)
    elif block.lang == "toml":
        tomllib.loads(block.code)
    elif block.lang == "json":
        json.loads(block.code)


@pytest.fixture(scope="session")
def docs_cache(tmp_path_factory) -> Path:
    """``paths.cache_dir`` of every documented training: generated data is made once."""
    return tmp_path_factory.mktemp("docs_cache")


#: Pages that train more than once (a sweep, or the CLI and the Python API in turn).
SLOW_PAGES = {"docs/how-to/ablation.md", "docs/getting-started.md", "README.md"}


@pytest.mark.parametrize(
    "page", [pytest.param(p, marks=pytest.mark.slow) if p in SLOW_PAGES else p for p in PAGES]
)
def test_every_code_block_of_the_page_runs(page, docs_cache, tmp_path, monkeypatch):
    """A page runs like a reader runs it: in an empty directory, top to bottom; ``$RUN`` is set
    by the page's own ``mmbridge train``."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RUN", raising=False)
    monkeypatch.setattr(sys.modules[__name__], "SMALL", [*SMALL, f"paths.cache_dir={docs_cache}"])
    real_train = mmbridge.train
    monkeypatch.setattr(
        mmbridge, "train", lambda overrides, **kw: real_train(_with_small(list(overrides)), **kw)
    )
    namespace: dict = {"__name__": "__docs__"}
    for block in blocks(page):
        check_block(block, namespace, tmp_path, monkeypatch.setenv)  # variables end with the test


def test_the_collector_reads_flags_and_refuses_what_it_cannot_run(tmp_path):
    page = tmp_path / "p.md"
    page.write_text(
        '```{ .bash .norun data-reason="8 GPUs" }\nsrun x\n```\n\n  ```python\n  a = 1\n  ```\n'
        "```bash\npip install mmbridge\n```\n"
    )
    rel = os.path.relpath(page, ROOT)
    norun, py, shell = blocks(rel)
    assert (norun.lang, norun.flags, norun.attrs, norun.line) == (
        "bash",
        {"norun"},
        {"data-reason": "8 GPUs"},
        1,
    )
    assert (py.lang, py.code, py.line) == ("python", "a = 1\n", 5)
    check_block(norun, {}, tmp_path)
    with pytest.raises(AssertionError, match="is not a mmbridge command"):
        check_block(shell, {}, tmp_path)
    with pytest.raises(AssertionError, match=r"\$DOCS_TEST_UNSET is not set here"):
        check_block(
            Block("p.md", 1, "bash", "mmbridge eval checkpoint=$DOCS_TEST_UNSET/final\n"),
            {},
            tmp_path,
        )
    with pytest.raises(AssertionError, match="needs data-reason"):
        check_block(Block("p.md", 1, "bash", "x\n", {"norun"}), {}, tmp_path)
    assert _with_small(["experiment=tiny", "stages.align.max_steps=5", "data=llava"]) == [
        "experiment=tiny",
        "stages.align.max_steps=5",
        "data=llava",
        *(a for a in SMALL if not a.startswith("stages.align.max_steps=")),
    ]


@pytest.mark.skipif(
    shutil.which("mkdocs", path=str(Path(sys.executable).parent)) is None,
    reason="the `docs` extra (mkdocs-material, mkdocstrings) is not installed",
)
def test_the_site_builds_with_warnings_as_errors(tmp_path):
    mkdocs = str(Path(sys.executable).parent / "mkdocs")
    proc = subprocess.run(
        [mkdocs, "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    api = (tmp_path / "site" / "reference" / "api" / "index.html").read_text(encoding="utf-8")
    assert (
        'id="mmbridge.load"' in api and 'id="mmbridge.Converter"' in api
    )  # mkdocstrings rendered it
    for page in PAGES[:-1]:  # README.md is GitHub's page, not the site's
        rel = Path(page).relative_to("docs").with_suffix("")
        html = (
            tmp_path
            / "site"
            / (
                "index.html"
                if rel.name == "index" and rel.parent == Path(".")
                else rel.parent / ("" if rel.name == "index" else rel.name) / "index.html"
            )
        )
        assert html.is_file(), f"{page} was not built ({html})"


def test_each_family_page_names_its_survey_section_and_every_component():
    """concepts/<family>.md names its section of 2311.07594 and every registered component of
    the family (from the same selection as README.md's generated table)."""
    registry = shared_registry()
    pages = ("converter", "perceiver", "tool-learning", "data-driven")
    for family, page in zip(FAMILIES, pages, strict=True):
        text = (DOCS / "concepts" / f"{page}.md").read_text(encoding="utf-8")
        section = re.search(r"§3\.\d", family.title).group(0)
        assert f"survey {section}" in text, f"concepts/{page}.md does not name {section}"
        names = {e.name for e in registry.entries() for _, selects in family.parts if selects(e)}
        missing = sorted(n for n in names if f"`{n}`" not in text)
        assert names and not missing, f"concepts/{page}.md does not name {missing}"


def test_every_config_key_of_the_reference_has_a_type_default_and_doc():
    rows = [
        line
        for line in (DOCS / "reference" / "config.md").read_text(encoding="utf-8").splitlines()
        if line.startswith("| `") and line.count(" | ") >= 4
    ]
    undocumented = [r.split(" | ")[0] for r in rows if not r.rstrip(" |").split(" | ")[-1].strip()]
    assert len(rows) > 40 and not undocumented, (
        f"keys without a doc (add one to KEY_DOCS): {undocumented}"
    )


#: Words of the project's own history, which a reader of the README has no use for.
HISTORY = (
    "last round",
    "this round",
    "the issue's target",
    "no gpu was lent",
    "this session",
    "what changed the figures",
)


def test_the_readme_is_short_its_links_resolve_and_it_tells_no_history():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 250
    assert not [h for h in HISTORY if h in text.lower()]
    for setup in (
        "bash scripts/setup.sh && .venv/bin/mmbridge train",
        "bash scripts/setup.sh && .venv/bin/python -m pytest",
    ):
        assert f"```bash\n{setup}\n```" in text, setup
    links = re.findall(r"\]\((?!https?://)([^)#]+)", text)
    assert links and not [link for link in links if not (ROOT / link).exists()]
