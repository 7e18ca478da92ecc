"""One module per ``mmbridge`` subcommand; each exposes ``main(argv: list[str]) -> int``. Its
one-line help for ``mmbridge --help`` is in :data:`mmbridge.cli.COMMANDS` (the only copy).

A command module imports its heavy dependencies (training, evaluation, exports, Hydra) inside
``main``: ``mmbridge <command> --help`` imports the module only, so it stays fast. These
function-local imports are deliberate; ``tests/unit/test_local_imports.py`` lists them.
"""
