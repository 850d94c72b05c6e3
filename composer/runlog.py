"""The run's log file: ``train.log`` in the run folder.

    with run_log(run_dir):          # Hydra's job log file when it is that one, else a handler of our own
        to_log_file("step 50/400 ...")   # the file only (the terminal has the progress bar / the table)

composer-train runs under Hydra, whose job logging writes every INFO message of the run to
``<run dir>/train.log`` (and to the terminal). :func:`run_log` makes sure there is such a file
also when Hydra's job logging is off or the run is started from Python (``composer.run.train``),
and that composer's INFO messages reach it. What the terminal already shows another way (the
rich progress bar, the summary table, a failed run's one-line error) is written to the file only.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

LOG_NAME = "train.log"
FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"  # Hydra's job-log format
log = logging.getLogger("composer.run")


def log_files(logger: logging.Logger = log) -> list[logging.FileHandler]:
    """The file handlers a message of ``logger`` reaches (its own and its ancestors')."""
    found: list[logging.FileHandler] = []
    node: logging.Logger | None = logger
    while node is not None:
        found += [h for h in node.handlers if isinstance(h, logging.FileHandler) and h not in found]
        node = node.parent if node.propagate else None
    return found


def to_log_file(message: str, level: int = logging.INFO, logger: logging.Logger = log) -> None:
    """Write ``message`` to the run's log file(s) only, not to the terminal."""
    record = logger.makeRecord(logger.name, level, __file__, 0, message, None, None)
    for handler in log_files(logger):
        if level >= handler.level:
            handler.handle(record)


@contextlib.contextmanager
def run_log(run_dir: str | os.PathLike) -> Iterator[Path]:
    """For the run: ``run_dir/train.log`` receives composer's INFO messages (a handler of our own
    unless Hydra's job log already writes that file); yields the file's path."""
    path = Path(run_dir).resolve() / LOG_NAME
    package = logging.getLogger("composer")
    level = package.level
    if package.getEffectiveLevel() > logging.INFO:
        package.setLevel(logging.INFO)
    handler = None
    if not any(Path(h.baseFilename).resolve() == path for h in log_files()):
        path.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(path, encoding="utf-8")
        handler.setFormatter(logging.Formatter(FORMAT))
        package.addHandler(handler)
    try:
        yield path
    finally:
        package.setLevel(level)
        if handler is not None:
            package.removeHandler(handler)
            handler.close()


__all__ = ["LOG_NAME", "log_files", "run_log", "to_log_file"]
