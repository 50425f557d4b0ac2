"""Pipelines: pure functions ``run(inputs, params, progress) -> Result``."""
