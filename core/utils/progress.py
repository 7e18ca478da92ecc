"""Progress of long work that reads the same in a terminal and in a log file.

In a terminal (stderr is a TTY) a ``rich`` bar is drawn; otherwise (a pipe, a batch job, a log
file) nothing would be drawn at all, so progress is reported as log lines instead: one every
``every_s`` seconds (30 by default), with done / total, items per second and the time left.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import TYPE_CHECKING, Any, cast

from rich.progress import Progress as RichProgress

if TYPE_CHECKING:
    from rich.progress import TaskID

log = logging.getLogger("mmbridge.utils.progress")


def interactive() -> bool:
    """Whether progress bars can be drawn (stderr is a terminal)."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def eta(seconds: float) -> str:
    """``95`` -> ``'1:35'``; ``3725`` -> ``'1:02:05'``."""
    if seconds != seconds or seconds == float("inf"):  # nan / inf
        return "?"
    s = int(round(max(0.0, seconds)))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class _Task:
    def __init__(self, desc: str, total: int) -> None:
        self.desc, self.total, self.done = desc, total, 0
        self.t0 = self.t_last = time.monotonic()


class Progress:
    """The subset of ``rich.progress.Progress`` that mmbridge uses (``add_task``, ``advance``,
    context manager), drawn as a bar in a terminal and logged as lines elsewhere.

    Args:
        transient: Remove the bar when done (terminal only).
        disable: Report nothing.
        every_s: Seconds between two log lines (no terminal).
    """

    def __init__(
        self, transient: bool = True, disable: bool = False, every_s: float = 30.0
    ) -> None:
        self.disable = disable
        self.every_s = every_s
        self._rich = None
        if not disable and interactive():
            self._rich = RichProgress(transient=transient)
        self._tasks: list[_Task] = []

    def __enter__(self) -> Progress:
        if self._rich is not None:
            self._rich.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._rich is not None:
            self._rich.__exit__(*exc)
            return
        if self.disable or exc[0] is not None:
            return
        for task in self._tasks:
            took = time.monotonic() - task.t0
            if took >= self.every_s / 3:  # short work needs no closing line
                log.info("%s: %d/%d done in %s", task.desc, task.done, task.total, eta(took))

    def add_task(self, desc: str, total: int) -> int:
        if self._rich is not None:
            return self._rich.add_task(desc, total=total)
        self._tasks.append(_Task(desc, total))
        return len(self._tasks) - 1

    def advance(self, task_id: int, n: int = 1) -> None:
        if self._rich is not None:
            self._rich.advance(cast("TaskID", task_id), n)  # an id that add_task returned
            return
        if self.disable:
            return
        task = self._tasks[task_id]
        task.done += n
        now = time.monotonic()
        if now - task.t_last >= self.every_s and task.done < task.total:
            task.t_last = now
            rate = task.done / max(now - task.t0, 1e-9)
            log.info(
                "%s: %d/%d (%.1f/s, %s left)",
                task.desc,
                task.done,
                task.total,
                rate,
                eta((task.total - task.done) / rate if rate > 0 else float("inf")),
            )
