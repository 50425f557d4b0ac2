"""Synthetic CBCT/CT pairs and the short bias-correction training run shared by the sCT tests."""

from __future__ import annotations

from typing import Any

import numpy as np

from models.training.sct_data import SCTCase
from models.training.sct_train import SCTTrainConfig


def synthetic_case(seed: int, shape: tuple[int, int, int]) -> SCTCase:
    """A box of soft tissue (-50..80 HU) with a bone insert (900 HU) in air, ``(K, H, W)``.

    The CBCT is ``0.9 * CT - 60`` HU (a HU bias a network must learn to undo); FOV everywhere.
    """
    rng = np.random.default_rng(seed)
    ct = np.full(shape, -1000, np.int16)
    ct[:, 8:32, 6:30] = rng.integers(-50, 80, size=(shape[0], 24, 24))
    ct[:, 15:20, 12:18] = 900
    cbct = (0.9 * ct.astype(np.float32) - 60).astype(np.int16)
    return SCTCase(f"pt_{seed}", cbct, ct, np.ones(shape, bool))


def bias_config(arch: str, batch: int, features: tuple[int, ...]) -> SCTTrainConfig:
    """60 fp32 steps on 32 x 32 crops, validated every 30: enough to halve the bias error."""
    return SCTTrainConfig(
        arch=arch,
        steps=60,
        batch=batch,
        lr=3e-3,
        warmup=5,
        size=32,
        precision="fp32",
        validate_every=30,
        features=features,
    )


def assert_halves_the_cbct_error(outcome: Any) -> None:
    """The best validation MAE is under half the raw CBCT's (which must show the bias)."""
    first = next(h for h in outcome.history if "validation" in h)
    raw = first["validation"]["cbct_mae_hu"]
    assert raw > 50
    assert outcome.best["mae_hu"] < 0.5 * raw
