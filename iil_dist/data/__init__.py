"""Scenario data: sources, the base/phase/test split with drift, WebDataset shards, indexed readers."""

from iil_dist.data.reader import (
    SampleDecodeError,
    SplitDataset,
    eval_batches,
    eval_indices,
    num_eval_batches,
    num_train_batches,
    train_batches,
    train_indices,
)
from iil_dist.data.scenario import (
    apply_drift,
    build_scenario,
    drift_source_positions,
    phase_name,
    split_names,
)
from iil_dist.data.shards import read_manifest, verify_shards, write_scenario
from iil_dist.data.sources import SOURCES, load_digits, load_source

__all__ = [
    "SOURCES",
    "SampleDecodeError",
    "SplitDataset",
    "apply_drift",
    "build_scenario",
    "drift_source_positions",
    "eval_batches",
    "eval_indices",
    "load_digits",
    "load_source",
    "num_eval_batches",
    "num_train_batches",
    "phase_name",
    "read_manifest",
    "split_names",
    "train_batches",
    "train_indices",
    "verify_shards",
    "write_scenario",
]
