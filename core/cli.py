"""The ``mmbridge`` command line: ``mmbridge <command> [args]``.

Each command lives in :mod:`mmbridge.commands` and is imported only when it runs, so
``mmbridge --help`` stays fast.
"""

from __future__ import annotations

import importlib
import logging
import sys

from mmbridge import __version__
from mmbridge.errors import MMBridgeError, did_you_mean

#: command -> (module, one-line help). Order = order in ``--help``.
#: (A command module is never named after a standard-library module: Lightning's DDP launcher
#: re-runs commands/train.py as a script, with commands/ first on sys.path; `inspect` shadowed
#: the standard `inspect` there.)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": (
        "mmbridge.commands.train",
        "train a model (Hydra overrides; no arguments = the default experiment)",
    ),
    "sweep": (
        "mmbridge.commands.sweep",
        "run a grid of trainings (comma lists) and write results tables and plots",
    ),
    "eval": (
        "mmbridge.commands.evaluate",
        "evaluate a checkpoint (exact match, or a benchmark: data=vqa|gqa|pope|multiple_choice)",
    ),
    "generate": (
        "mmbridge.commands.generate",
        'answer a prompt about media: checkpoint=PATH image=PATH prompt="..."',
    ),
    "serve": (
        "mmbridge.commands.serve",
        "serve a checkpoint behind the OpenAI API: checkpoint=PATH [port=8000]",
    ),
    "export": (
        "mmbridge.commands.export",
        "export a checkpoint: checkpoint=PATH out=DIR format=hf|peft|bundle",
    ),
    "report": (
        "mmbridge.commands.report",
        "a sweep's results.csv/.md, plots and report.html; a run's report.html",
    ),
    "demo": (
        "mmbridge.commands.demo",
        "a web page (Gradio) to chat about an image or audio: checkpoint=A [checkpoint=B]",
    ),
    "plugins": (
        "mmbridge.commands.plugins",
        "list registered components by kind; `plugins check` runs the contract kit",
    ),
    "inspect": (
        "mmbridge.commands.inspect_samples",
        "show what the model sees: a stage's first samples as text, tokens, labels, media slots",
    ),
    "plan": (
        "mmbridge.commands.plan",
        "parameters, tokens, steps and memory per GPU of a config, without weights or data",
    ),
    "config": (
        "mmbridge.commands.config",
        "print the composed config for overrides; --groups lists every option",
    ),
    "assets": (
        "mmbridge.commands.assets",
        "list the offline pretrained models; --convert NAME prepares one",
    ),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [
        "usage: mmbridge <command> [args...]",
        "",
        "Bridge modalities (images, audio, ...) into large language models.",
        "",
        "commands:",
    ]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += [
        "",
        "`mmbridge <command> --help` describes a command. Environment: "
        "MMBRIDGE_CACHE (cache dir), MMBRIDGE_DISABLE_PLUGINS (1 = no third-party plugins, "
        "or a comma list of plugin names).",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version"):
        print(f"mmbridge {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(
            f"mmbridge: unknown command '{name}'{did_you_mean(name, COMMANDS)}; "
            f"commands: {', '.join(COMMANDS)}",
            file=sys.stderr,
        )
        return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    module = importlib.import_module(COMMANDS[name][0])
    try:
        return int(module.main(rest) or 0)
    except MMBridgeError as exc:
        print(f"mmbridge {name}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
