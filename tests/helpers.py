"""Shared values of the tests that run several real gloo ranks in spawned processes (no Ray)."""

from __future__ import annotations

import os

from iil_dist.engine.local_group import count_collectives, finish_rank, free_port, init_rank, spawn

__all__ = ["REPO_CONFIG", "SHORT", "count_collectives", "finish_rank", "free_port", "init_rank", "spawn"]

REPO_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "digits.yaml")

# a short experiment: 2 phases of 3 epochs after a 2-epoch base phase, KC-EMA from epoch 2
SHORT = ["data.num_phases=2", "optim.base_epochs=2", "optim.epochs_per_phase=3", "method.freeze_epochs=1",
         "tracking.log_every=5", "tracking.print_every=10", "tracking.wandb_mode=disabled"]  # fmt: skip
