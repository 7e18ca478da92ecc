"""One module per ``mmbridge`` subcommand; each exposes ``main(argv: list[str]) -> int`` and
``HELP`` (one line for ``mmbridge --help``)."""
