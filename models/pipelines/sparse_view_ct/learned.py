"""The ``learned`` method: the trained GloReDi-style network applied to sparse-view FBP slices.

The network (:class:`models.networks.gloredi.GloReDiNet`) maps an FBP slice (HU / 1000) and the
view count it was reconstructed from to a corrected slice. It was trained on 128 x 128 axial
slices of head-and-neck planning CTs (2.7-5.4 mm pixels after resampling, see the model card),
simulated with the clinical fan-beam scanner of :mod:`models.training.sparse_view_data`; it
runs on any slice size, but its gains were measured only at that scale.

Weights are an fp16 state dict (what ``voxelgate train sparse-view-ct`` writes); the
architecture sizes are those of :data:`ARCHITECTURE` unless given.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import lru_cache
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch

from models.errors import InputRejected
from models.networks.gloredi import HU_SCALE, GloReDiNet

ARCHITECTURE: Mapping[str, int] = {"features": 32, "ffc_blocks": 4, "embed": 64}
"""Sizes of the shipped network (``TrainConfig`` defaults)."""

MODELS_DIR = Path(__file__).resolve().parents[2]
"""The ``models`` package folder, which registry weight paths are relative to."""


def load_network(path: Path, device: str = "cpu") -> GloReDiNet:
    """The network with the weights at ``path`` (fp16 or fp32 state dict), in eval mode, fp32.

    Raises:
        InputRejected: Missing file or weights that do not fit the architecture.
    """
    return _cached(str(Path(path).resolve()), device)


@lru_cache(maxsize=4)
def _cached(path: str, device: str) -> GloReDiNet:
    if not Path(path).is_file():
        raise InputRejected(f"learned weights {path} are missing")
    state = torch.load(path, map_location="cpu", weights_only=True)
    net = GloReDiNet(**ARCHITECTURE)
    try:
        net.load_state_dict({k: v.float() for k, v in state.items()})
    except RuntimeError as exc:
        raise InputRejected(f"weights {Path(path).name} do not fit GloReDiNet: {exc}") from exc
    return net.to(device).eval()


@torch.no_grad()
def postprocess(
    fbp_hu: npt.NDArray[np.float32],
    views: int,
    net: GloReDiNet,
    *,
    batch: int = 4,
    progress: Callable[[float], None] | None = None,
) -> npt.NDArray[np.float32]:
    """Apply the network to FBP slices.

    Args:
        fbp_hu: ``(K, H, W)`` FBP slices in HU (rows/cols as in the Volume).
        views: View count the FBP was reconstructed from (conditions the network).
        net: From :func:`load_network`.
        batch: Slices per forward pass.
        progress: Called with the fraction of slices done.

    Returns:
        ``(K, H, W)`` float32 HU.
    """
    device = next(net.parameters()).device
    out = np.empty(fbp_hu.shape, dtype=np.float32)
    k = fbp_hu.shape[0]
    for lo in range(0, k, batch):
        part = np.ascontiguousarray(fbp_hu[lo : lo + batch], dtype=np.float32) / HU_SCALE
        x = torch.from_numpy(part)[:, None].to(device)
        v = torch.full((x.shape[0],), float(views), device=device)
        out[lo : lo + batch] = net(x, v).image[:, 0].float().cpu().numpy() * HU_SCALE
        if progress is not None:
            progress(min(lo + batch, k) / k)
    return out
