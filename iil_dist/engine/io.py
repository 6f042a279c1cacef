"""Atomic writes: a file is written to a temporary name in its folder and renamed into place,
so a crash leaves either the previous file or the new one, never a torn mix."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch


def _atomic_write(path: Path, write: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    _atomic_write(path, lambda fh: fh.write((json.dumps(obj, indent=2) + "\n").encode()))


def atomic_torch_save(path: Path, obj: Any) -> None:
    _atomic_write(path, lambda fh: torch.save(obj, fh))
