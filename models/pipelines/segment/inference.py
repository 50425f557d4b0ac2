"""Intensity handling, sliding-window inference and label postprocessing (torch, scipy)."""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from monai.inferers import sliding_window_inference
from scipy import ndimage

from models.errors import InputRejected
from models.pipelines.segment.card import Intensity

MIN_WINDOW_FRACTION = 0.25
"""A volume is padded up to the window when smaller; it is refused when, on the network grid,
any axis is shorter than this fraction of the window (the network would see mostly padding)."""


def normalise(array: npt.NDArray[Any], intensity: Intensity) -> npt.NDArray[np.float32]:
    """Apply the card's intensity handling.

    Args:
        array: Image in its units (HU for CT), any shape.
        intensity: ``window``: clip to ``[lower, upper]`` and scale to ``[0, 1]``; ``zscore``:
            ``(x - mean) / std`` with the card's values, else the array's own.

    Returns:
        float32 array, same shape.
    """
    x = np.asarray(array, dtype=np.float32)
    if intensity.kind == "window":
        lo, hi = float(intensity.lower or 0.0), float(intensity.upper or 1.0)
        return ((np.clip(x, lo, hi) - lo) / (hi - lo)).astype(np.float32)
    mean = float(x.mean()) if intensity.mean is None else intensity.mean
    std = float(x.std()) if intensity.std is None else intensity.std
    return ((x - mean) / max(std, 1e-6)).astype(np.float32)


def resample_image(
    array: npt.NDArray[np.float32], shape: tuple[int, int, int], device: str
) -> torch.Tensor:
    """Trilinear resampling (voxel edges aligned) of a canonical image to the network grid.

    Args:
        array: float32, canonical shape ``(n0, n1, n2)``.
        shape: Network grid shape ``(n'0, n'1, n'2)``.
        device: Torch device.

    Returns:
        Tensor ``(1, 1, n'0, n'1, n'2)`` float32 on ``device``.
    """
    x = torch.from_numpy(np.ascontiguousarray(array)).to(device)[None, None]
    if tuple(x.shape[2:]) == shape:
        return x
    return F.interpolate(x, size=shape, mode="trilinear", align_corners=False)


def check_extent(shape: tuple[int, ...], patch: tuple[int, int, int]) -> bool:
    """Whether the network grid needs padding to the window; refuse far too small volumes.

    Returns:
        ``True`` when some axis is shorter than the window (MONAI then pads it).

    Raises:
        InputRejected: An axis shorter than :data:`MIN_WINDOW_FRACTION` of the window.
    """
    small = [t for t in range(3) if shape[t] < max(1, round(MIN_WINDOW_FRACTION * patch[t]))]
    if small:
        raise InputRejected(
            f"volume too small for the model's window: {list(shape)} voxels at the model's "
            f"spacing against a {list(patch)} window (each axis needs at least "
            f"{MIN_WINDOW_FRACTION:.0%} of the window; smaller volumes are padded)"
        )
    return any(shape[t] < patch[t] for t in range(3))


def predict_labels(
    image: torch.Tensor,
    network: torch.nn.Module,
    patch: tuple[int, int, int],
    *,
    overlap: float,
    sw_batch: int,
    bf16: bool,
) -> npt.NDArray[np.uint16]:
    """Sliding-window inference with Gaussian blending, then argmax.

    Windows smaller than the volume tile it with ``overlap``; a volume smaller than the window
    is padded (constant = the image minimum, i.e. air for CT windows) and cropped back by MONAI.

    Args:
        image: ``(1, 1, D0, D1, D2)`` normalised image on the network grid.
        network: Maps ``(B, 1, p0, p1, p2)`` to logits ``(B, C, p0, p1, p2)``.
        patch: Window size (voxels).
        overlap: Fraction of overlap between windows.
        sw_batch: Windows per network call.
        bf16: Run under bfloat16 autocast.

    Returns:
        Class indices ``(D0, D1, D2)`` uint16 (class ``c`` = label value ``c``; 0 background).
    """
    autocast: Any = (
        torch.autocast(image.device.type, dtype=torch.bfloat16)
        if bf16
        else contextlib.nullcontext()
    )
    with torch.inference_mode(), autocast:
        logits = sliding_window_inference(
            image,
            roi_size=patch,
            sw_batch_size=sw_batch,
            predictor=network,
            overlap=overlap,
            mode="gaussian",
            padding_mode="constant",
            cval=float(image.min()),
        )
    if not isinstance(logits, torch.Tensor):
        raise InputRejected("the network returned no single logits tensor")
    return logits[0].argmax(0).to(torch.int32).cpu().numpy().astype(np.uint16)


def largest_component(labels: npt.NDArray[np.integer[Any]]) -> npt.NDArray[np.integer[Any]]:
    """Keep the largest 26-connected component of every label value (others -> 0), in place."""
    structure = np.ones((3, 3, 3), dtype=bool)
    for value in np.unique(labels):
        if value == 0:
            continue
        mask = labels == value
        comp, n = ndimage.label(mask, structure=structure)
        if n > 1:
            sizes = np.bincount(comp.ravel())
            sizes[0] = 0
            labels[mask & (comp != int(sizes.argmax()))] = 0
    return labels


def fill_holes(labels: npt.NDArray[np.integer[Any]]) -> npt.NDArray[np.integer[Any]]:
    """Fill background voxels enclosed by one label (3D) with that label, in place."""
    for value in np.unique(labels):
        if value == 0:
            continue
        filled = ndimage.binary_fill_holes(labels == value)
        labels[filled & (labels == 0)] = value
    return labels
