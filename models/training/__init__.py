"""Training code for learned pipelines (pure compute: data arrives as arrays, state as dicts).

* :mod:`models.training.sparse_view_data`: openkbp patient split, axial slices, fan-beam
  sparse-view simulation with Poisson noise and fixed seeds, batches and a validation set.
* :mod:`models.training.sparse_view_train`: the resumable GloReDi-style training loop.

File access (reading CT volumes, writing checkpoints and weights) belongs to the caller
(:mod:`service.cli_train`).
"""
