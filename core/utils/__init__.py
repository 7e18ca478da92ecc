"""Helpers shared by core and plugins: atomic writes, progress, executables, cache integrity,
media I/O, small nn builders, the run-directory lock, answer metrics."""
