"""Logging set-up: console on rank 0, one log file per rank in the run directory."""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
from pathlib import Path
from typing import TextIO

_FORMAT = "%(asctime)s %(levelname)s [rank %(rank)s] %(name)s: %(message)s"


class _RankFilter(logging.Filter):
    def __init__(self, rank: int) -> None:
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = self.rank
        return True


def setup_logging(rank: int, log_dir: Path | None = None, level: int = logging.INFO) -> None:
    """Configures the `iil_dist` logger once per process; safe to call again (handlers replaced)."""
    logger = logging.getLogger("iil_dist")
    logger.setLevel(level)
    logger.propagate = False
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    handlers: list[logging.Handler] = []
    if rank == 0:
        handlers.append(logging.StreamHandler(sys.stdout))
    if log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_dir / f"rank{rank}.log"))
    for handler in handlers:
        handler.addFilter(_RankFilter(rank))
        handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%H:%M:%S"))
        logger.addHandler(handler)


class LogFollower:
    """Echoes the lines appended to a log file to a stream, from a background thread.

    The driver of a local Ray cluster uses it to show rank 0's log as the run's console: Ray's own
    forwarding of worker output would interleave every worker's stdout and Ray Train's internal
    messages, each with a process prefix. Only complete lines are echoed; the rest of the file is
    read once more when the follower stops, so nothing written before `stop` is missed.
    """

    def __init__(self, path: Path, stream: TextIO | None = None, interval_s: float = 0.2) -> None:
        self.path = path
        self.stream = stream or sys.stdout
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"follow-{path.name}", daemon=True)
        self._file: TextIO | None = None
        self._partial = ""
        # a resumed run appends to its log: echo only what is written from now on
        self._offset = path.stat().st_size if path.exists() else 0

    def __enter__(self) -> LogFollower:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._echo(final=True)
        if self._file is not None:
            self._file.close()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._echo(final=False)

    def _echo(self, final: bool) -> None:
        if self._file is None:
            if not self.path.exists():
                return
            self._file = open(self.path, encoding="utf-8", errors="replace")  # noqa: SIM115
            self._file.seek(self._offset)
        text = self._partial + self._file.read()
        lines = text.split("\n")
        # the last piece is an unfinished line unless the writer is done
        self._partial = "" if final else lines.pop()
        for line in lines:
            if line:
                self.stream.write(line + "\n")
        self.stream.flush()


def code_revision() -> str:
    """The git commit the package runs from, `-dirty` if it has uncommitted changes; `unknown` outside a
    checkout (an installed wheel) or without git."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here, capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{commit}-dirty" if dirty else commit
