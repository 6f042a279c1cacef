"""iil-dist: instance-incremental learning with decision-boundary-aware distillation at cluster scale."""
