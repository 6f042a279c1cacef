"""Fault points: places where a rank can be told to stop and wait, so that a test kills it exactly there,
as a lost node would (during a consolidation, during an evaluation).

Off unless IIL_DIST_FAULT_POINTS is set, e.g. "consolidate@1.3:1,evaluate@2:0" (point:rank). A rank that
reaches a listed point writes its pid to IIL_DIST_FAULT_DIR/<point>-rank<R> and sleeps until killed; a
point whose file exists is passed, so the restarted run goes on through it.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from iil_dist.engine.dist import rank

POINTS_ENV = "IIL_DIST_FAULT_POINTS"
DIR_ENV = "IIL_DIST_FAULT_DIR"


def fault_point(name: str) -> None:
    """Waits here to be killed if `name` is listed for this rank and has not been hit before."""
    spec = os.environ.get(POINTS_ENV)
    if not spec or f"{name}:{rank()}" not in spec.split(","):
        return
    marker = Path(os.environ[DIR_ENV]) / f"{name}-rank{rank()}"
    if marker.exists():
        return
    marker.write_text(str(os.getpid()))
    while True:
        time.sleep(1)
