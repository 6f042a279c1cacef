"""The new-data-only rule of METHOD.md §2: in a phase t >= 1 no method except `joint` trains on a sample of
D(0) or of an earlier phase.

The check watches the real read path: every sample the real decoder turns into a tensor while a training
epoch runs is recorded by its shard key, for every method, on real shards read by index and streamed. Joint
training, which breaks the rule on purpose, is the control that shows the check sees a violation.
"""

import json
from pathlib import Path

import pytest
from helpers import REPO_CONFIG, SHORT, finish_rank, init_rank, spawn

METHODS = ("dbd", "finetune", "lwf", "mean_teacher", "joint")


def _worker(rank: int, world: int, port: int, scenario: str, runs: str, read: str) -> None:
    from iil_dist.config import load
    from iil_dist.data import reader
    from iil_dist.engine import trainer

    init_rank(rank, world, port)
    seen: dict[int, set[str]] = {}
    current: list[int] = []  # the phase whose training epoch is running, if one is

    decode, train_epoch = reader.SampleDecoder.__call__, trainer.PhaseRunner._train_epoch

    def recording_decode(self, members, key, where):  # noqa: ANN001, ANN202
        if current:
            seen.setdefault(current[-1], set()).add(key)
        return decode(self, members, key, where)

    def marked_epoch(self, phase, *args, **kwargs):  # noqa: ANN001, ANN202
        current.append(phase)
        try:
            return train_epoch(self, phase, *args, **kwargs)
        finally:
            current.pop()

    reader.SampleDecoder.__call__ = recording_decode
    trainer.PhaseRunner._train_epoch = marked_epoch
    streamed = [f"data.shard_url=pipe:cat {scenario}/{{file}}"] if read == "streamed" else []
    for method in METHODS:
        seen.clear()
        cfg = load(REPO_CONFIG, [*SHORT, f"data.root={scenario}", "data.in_memory=false", *streamed,
                                 f"method.name={method}"])  # fmt: skip
        runner = trainer.PhaseRunner(cfg, Path(runs) / method)
        runner.run()
        runner.teacher.destroy()
        out = Path(runs) / f"{method}-keys-rank{rank}.json"
        out.write_text(json.dumps({phase: sorted(keys) for phase, keys in seen.items()}))
    finish_rank()


@pytest.mark.timeout(600)
@pytest.mark.parametrize("read", ["indexed", "streamed"])
def test_phases_train_on_their_own_data_only(tmp_path: Path, tiny_scenario: Path, read: str) -> None:
    """Guards against a method that reads D(0) or an earlier phase's data while training a later phase
    (the IIL rule), and against a check too blind to see it (joint must be caught reading them)."""
    from iil_dist.data.shards import read_manifest

    spawn(_worker, 2, str(tiny_scenario), str(tmp_path), read)
    sizes = {name: entry["num_samples"] for name, entry in read_manifest(tiny_scenario)["splits"].items()}
    for method in METHODS:
        seen: dict[int, set[str]] = {}
        for rank in range(2):
            for phase, keys in json.loads((tmp_path / f"{method}-keys-rank{rank}.json").read_text()).items():
                seen.setdefault(int(phase), set()).update(keys)
        assert sorted(seen) == [0, 1, 2], method
        for phase, keys in seen.items():
            splits = {key.rsplit("-", 1)[0] for key in keys}
            allowed = ["base", *(f"phase-{t:02d}" for t in range(1, phase + 1))]
            if method == "joint":
                # the control: every split up to this one, each read in full over the two ranks
                assert splits == set(allowed), (method, phase, splits)
                assert len(keys) == sum(sizes[s] for s in allowed)
            else:
                expected = "base" if phase == 0 else f"phase-{phase:02d}"
                assert splits == {expected}, f"{method} read {sorted(splits - {expected})} in phase {phase}"
                assert len(keys) == sizes[expected]
