"""Scenario data: sources, the base/phase/test split with drift, WebDataset shards, readers.

Modules are imported where used (`iil_dist.data.shards`, `iil_dist.data.reader`, ...): the shard
writer's pool processes then import numpy and PIL only, not torch.
"""
