"""The driver's console (following rank 0's log file) and the wandb tracker's fallback."""

import io
import time

import pytest

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


@pytest.mark.timeout(120)
def test_unreachable_wandb_server_falls_back_to_offline(tmp_path, monkeypatch, caplog):
    """Guards against training that hangs or dies because the wandb server cannot be reached in online mode:
    within a bounded time the run is logged offline, with a warning that names the fallback and not the key."""
    import time

    from iil_dist.config import from_dict
    from iil_dist.tracking.tracker import Tracker

    key = "0123456789abcdef" * 2 + "deadbeef"
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setenv("WANDB_API_KEY", key)
    cfg = from_dict({}, ["tracking.wandb_mode=online", "tracking.init_timeout_s=5", "name=unreachable"])
    start = time.monotonic()
    tracker = Tracker(cfg, tmp_path / "run", total_steps=10, revision="test")
    elapsed = time.monotonic() - start
    tracker.log({"train/loss": 1.0}, step=1)
    tracker.close()
    assert tracker.mode == "offline" and elapsed < 90
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb"))
    warning = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "wandb" in r.getMessage()]
    assert warning and "logging offline" in warning[0] and key not in warning[0]
