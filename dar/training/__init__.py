"""Training runs: the typed run configuration (:mod:`~dar.training.config`), the seeded, distributed
runtime (:mod:`~dar.training.runtime`), checkpoints (:mod:`~dar.training.checkpoint`) and the trainer
(:mod:`~dar.training.trainer`)."""
