"""The help a user reads: every command's ``--help``, what ``mmbridge eval --help`` says about
benchmarks and lmms-eval, and whole first sentences without reST in ``mmbridge plugins``."""

from __future__ import annotations

import importlib

import pytest
from helpers import shared_registry

from mmbridge.cli import COMMANDS, usage
from mmbridge.registry import plain_first_sentence


def test_plain_first_sentence():
    doc = """A per-token MLP ``Linear -> GELU``; ``depth=2`` is LLaVA-1.5's
    projector (2310.03744 §3.2), e.g. for CLIP. More text.

    Args:
        x: ignored."""
    assert plain_first_sentence(doc) == (
        "A per-token MLP Linear -> GELU; depth=2 is LLaVA-1.5's "
        "projector (2310.03744 §3.2), e.g. for CLIP."
    )
    roles = "Reads :class:`~mmbridge.model.Branch` and :func:`mmbridge.utils.io.x`."
    assert plain_first_sentence(roles) == "Reads Branch and mmbridge.utils.io.x."
    assert plain_first_sentence("No full stop at all") == "No full stop at all"
    assert plain_first_sentence(None) == ""


def test_every_component_summary_is_a_whole_plain_sentence():
    for entry in shared_registry().entries():
        text = entry.summary
        assert text, f"{entry.kind} {entry.name}: no docstring"
        assert "``" not in text and ":class:" not in text and ":func:" not in text, text
        assert text.rstrip(")").endswith((".", "!", "?")), f"{entry.kind} {entry.name}: '{text}'"


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_command_has_help(name, capsys):
    module = importlib.import_module(COMMANDS[name][0])
    try:
        code = module.main(["--help"])
    except SystemExit as exc:  # argparse-based commands
        code = exc.code
    assert code in (0, None)
    assert "usage" in capsys.readouterr().out.lower()


def test_eval_help_names_the_benchmarks_and_lmms_eval(capsys):
    from mmbridge.commands.evaluate import main

    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for word in (
        "data=vqa",
        "data=gqa",
        "data=pope",
        "data=multiple_choice",
        "MMBench",
        "ScienceQA",
        "lmms-eval --model mmbridge",
    ):
        assert word in out, word
    assert "demo" in usage() and "report.html" in usage()
