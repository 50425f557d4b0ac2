"""Shared data of the ``cbct-to-sct`` tests: a held-out real CT and CBCTs simulated from it.

The CT is OpenKBP ``validation-pats/pt_201`` (a held-out head-and-neck planning CT, 128^3 at
3 x 5.4 x 5.4 mm, HU), block-averaged by 2 to 64^3 at 6 x 10.8 x 10.8 mm so that a simulation
of 48 projections takes about a second. Simulations are cached per process (the first RTK
call costs 15-20 s, once), with fixed seeds. Every volume gets the frame of reference
:data:`FRAME` (NIfTI carries none).
"""

from __future__ import annotations

import dataclasses
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest

from models.volume import Volume

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
HELD_OUT_CT = DATA / "openkbp" / "validation-pats" / "pt_201" / "ct.nii.gz"
FRAME = "1.2.826.0.1.3680043.8.498.7001"
"""Frame of reference UID given to the CT and the CBCTs simulated from it."""

SCATTER = {"spr": 1.0, "cupping": 0.03, "i0": 1e5}
"""Artefacts of the scatter/cupping CBCT (no truncation): a strong global HU error."""

TRUNCATED = {"spr": 0.5, "cupping": 0.02, "i0": 1e5, "truncation_fov_mm": 200.0}
"""Artefacts of the truncated CBCT: a 200 mm field of view, narrower than the shoulders."""


def block_mean(volume: Volume, factor: int) -> Volume:
    """Average ``factor``^3 blocks; the affine follows (voxel centres of the coarse grid)."""
    a = np.asarray(volume.array, dtype=np.float32)
    k, j, i = (n // factor * factor for n in a.shape)
    f = factor
    coarse = a[:k, :j, :i].reshape(k // f, f, j // f, f, i // f, f).mean(axis=(1, 3, 5))
    affine = volume.affine.copy()
    affine[:3, :3] *= f
    affine[:3, 3] = volume.index_to_lps([(f - 1) / 2] * 3)
    return dataclasses.replace(volume, array=coarse, affine=affine)


@lru_cache(maxsize=1)
def full_ct() -> Volume:
    """The held-out CT at its own resolution (CT, HU, frame :data:`FRAME`); skips if absent."""
    if not HELD_OUT_CT.is_file():
        pytest.skip(f"{HELD_OUT_CT} not available")
    from service.io.nifti import read_nifti

    ct = read_nifti(HELD_OUT_CT)
    return dataclasses.replace(ct, modality="CT", units="HU", frame_of_reference_uid=FRAME)


@lru_cache(maxsize=1)
def small_ct() -> Volume:
    """The held-out CT block-averaged to 64^3."""
    return block_mean(full_ct(), 2)


@lru_cache(maxsize=4)
def simulated(kind: str) -> tuple[Volume, Volume]:
    """``(cbct, true_fov_mask)`` for ``kind`` ``"scatter"`` or ``"truncated"`` (seeded)."""
    pytest.importorskip("itk")
    from models.physics.cbct import CBCTArtefacts, CBCTGeometry, simulate_cbct

    artefacts = CBCTArtefacts(**(SCATTER if kind == "scatter" else TRUNCATED))  # type: ignore[arg-type]
    result = simulate_cbct(
        small_ct(), CBCTGeometry(n_projections=48), artefacts, seed=11, threads=1
    )
    return result.volume, result.fov_mask
