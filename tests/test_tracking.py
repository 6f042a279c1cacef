"""The driver's console: following rank 0's log file."""

import io
import time

from iil_dist.tracking.logs import LogFollower


def test_log_follower_echoes_complete_lines_and_drains_on_stop(tmp_path):
    """Guards against a console that misses the last lines of a run, prints half lines, or needs the
    file to exist when it starts (rank 0 creates it only once its worker is up)."""
    path = tmp_path / "logs" / "rank0.log"
    out = io.StringIO()
    with LogFollower(path, out, interval_s=0.01):
        time.sleep(0.05)  # no file yet
        path.parent.mkdir()
        with open(path, "w") as fh:
            fh.write("first line\nsecond ")
            fh.flush()
            deadline = time.monotonic() + 5
            while "first line" not in out.getvalue() and time.monotonic() < deadline:
                time.sleep(0.01)
            assert out.getvalue() == "first line\n"  # the unfinished line is held back
            fh.write("line\nlast line\n")
    assert out.getvalue() == "first line\nsecond line\nlast line\n"
