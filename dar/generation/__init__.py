"""Samples from a checkpoint: ADM-format ``.npz`` files for evaluation, sharded and resumable
(:mod:`~dar.generation.generate`), and labelled grids (:mod:`~dar.generation.grid`)."""
