"""What the segmentation speed and memory benchmarks share: the baseline and random models.

* :func:`install_random_model`: a MONAI UNet with random weights installed as a model
  (card + sha256-checked state dict) with a 96³ window and a CT window of -500..500 HU.
* :func:`monai_baseline`: the former pipeline path (whole-array normalisation, MONAI's
  full-buffer ``sliding_window_inference``, fp32, overlap 0.5, sw_batch 4, constant blending,
  argmax, labels back onto the source grid), the baseline of both benchmarks.

Used by ``benchmarks/segment.py`` (speed) and ``benchmarks/segment_memory.py`` (memory).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.pipelines.segment.card import ModelCard
from models.pipelines.segment.geometry import nearest_back, network_shape, reorientation
from models.pipelines.segment.networks import FinalOutput
from models.provenance import file_sha256
from models.volume import Volume

THREADS = 2
PATCH = (96, 96, 96)
CT_WINDOW = {"kind": "window", "lower": -500.0, "upper": 500.0}
BASELINE = "MONAI sliding_window_inference fp32, overlap 0.5, sw_batch 4, constant"


def install_random_model(
    root: Path,
    name: str,
    labels: tuple[str, ...],
    net_args: dict[str, Any],
    spacing: tuple[float, float, float],
) -> None:
    """A MONAI UNet with random weights (seed 0) as an installed model ``root/name``."""
    from monai.networks.nets import UNet

    torch.manual_seed(0)
    net = UNet(spatial_dims=3, in_channels=1, out_channels=len(labels) + 1, **net_args)
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), folder / "model.pt")
    card = {
        "name": name,
        "version": "0.0.0",
        "architecture": {"name": "unet3d", "args": net_args},
        "weights": {
            "file": "model.pt",
            "sha256": file_sha256(folder / "model.pt"),
            "format": "state-dict",
        },
        "modality": "CT",
        "spacing_mm": list(spacing),
        "orientation": "RAS",
        "intensity": CT_WINDOW,
        "patch_size": list(PATCH),
        "labels": [{"value": v + 1, "name": n} for v, n in enumerate(labels)],
        "training_data": "none: random weights (benchmark only)",
        "metrics": "none",
    }
    (folder / "card.json").write_text(json.dumps(card))


def whole_array_normalise(array: np.ndarray, card: ModelCard) -> np.ndarray:
    """The former pipeline's normalisation (one whole-array expression, float32)."""
    x = np.asarray(array, dtype=np.float32)
    lo, hi = float(card.intensity.lower or 0.0), float(card.intensity.upper or 1.0)
    if card.intensity.kind == "window":
        return ((np.clip(x, lo, hi) - lo) / (hi - lo)).astype(np.float32)
    mean = float(x.mean()) if card.intensity.mean is None else card.intensity.mean
    std = float(x.std()) if card.intensity.std is None else card.intensity.std
    return ((x - mean) / max(std, 1e-6)).astype(np.float32)


def monai_baseline(
    image: Volume,
    card: ModelCard,
    network: FinalOutput,
    *,
    overlap: float = 0.5,
    sw_batch: int = 4,
    mode: str = "constant",
) -> np.ndarray:
    """The former pipeline path with MONAI's full-buffer sliding window; labels on the source."""
    import torch.nn.functional as F
    from monai.inferers import sliding_window_inference

    reo = reorientation(image.affine, card.orientation)
    canonical = reo.apply(image.array)
    canon_affine = reo.affine(image.affine, image.shape)
    spacing = tuple(float(s) for s in np.linalg.norm(canon_affine[:3, :3], axis=0))
    net_shape = network_shape(canonical.shape, spacing, card.spacing_mm)
    x = torch.from_numpy(np.ascontiguousarray(whole_array_normalise(canonical, card)))[None, None]
    if tuple(x.shape[2:]) != net_shape:
        x = F.interpolate(x, size=net_shape, mode="trilinear", align_corners=False)
    with torch.inference_mode():
        logits = sliding_window_inference(
            x, card.patch_size, sw_batch, network, overlap=overlap, mode=mode
        )
        assert isinstance(logits, torch.Tensor)
        classes = logits[0].argmax(0).to(torch.int32).numpy().astype(np.uint16)
    del logits, x
    return reo.invert(nearest_back(classes.astype(np.uint8), canonical.shape))
