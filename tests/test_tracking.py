"""The driver's console (following rank 0's log file) and the wandb tracker's fallback."""

import io
import threading
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


def test_wandb_finish_that_hangs_is_bounded(tmp_path, monkeypatch, caplog):
    """Guards against a job that never ends because wandb keeps retrying a server lost mid-run when the run
    finishes (its finish has no time limit): the tracker waits tracking.finish_timeout_s, then warns."""
    from iil_dist.config import from_dict
    from iil_dist.tracking.tracker import Tracker

    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = from_dict({}, ["tracking.wandb_mode=offline", "tracking.finish_timeout_s=2", "name=hang"])
    tracker = Tracker(cfg, tmp_path / "run", total_steps=10, revision="test")
    tracker.log({"train/loss": 1.0}, step=1)
    real_finish = tracker._run.finish

    server_back = threading.Event()

    def lost_server_finish(*args, **kwargs):  # the fault: uploads that do not complete until the server is back
        server_back.wait(60)
        real_finish(*args, **kwargs)

    monkeypatch.setattr(tracker._run, "finish", lost_server_finish)
    start = time.monotonic()
    tracker.close()
    assert 2 <= time.monotonic() - start < 10
    warning = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "finish" in r.getMessage()]
    assert warning and "tracking.finish_timeout_s" in warning[0] and "wandb sync" in warning[0]
    assert (tmp_path / "run" / "metrics.jsonl").read_text().count("\n") == 1
    # the server comes back: the run finishes in the background (and leaves no open run to the next test)
    server_back.set()
    for thread in threading.enumerate():
        if thread.name == "wandb-finish":
            thread.join(30)


def test_wandb_finish_in_time_leaves_a_complete_run(tmp_path, monkeypatch, caplog):
    """Guards against the bounded finish cutting a normal one short: the offline run is complete, no warning."""
    from iil_dist.config import from_dict
    from iil_dist.tracking.tracker import Tracker

    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = from_dict({}, ["tracking.wandb_mode=offline", "name=ok"])
    tracker = Tracker(cfg, tmp_path / "run", total_steps=10, revision="test")
    tracker.log({"train/loss": 1.0}, step=1)
    tracker.close()
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
    files = list((tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert files and files[0].stat().st_size > 0
