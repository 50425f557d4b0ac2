"""The ``learned`` method of ``cbct-to-sct``: a trained network applied to a CBCT volume.

Steps of :func:`translate`:

1. Reorient the CBCT (``array[k, j, i]``, LPS affine) to the network's canonical frame
   (:data:`~models.training.sct_data.CANONICAL`, axial slices along axis 0) by axis
   permutation and flips only.
2. Where the voxel spacing lies outside the range the network was trained on (the weights file
   records it), resample linearly to the nearest spacing inside that range; else keep the grid.
3. Translate slice by slice (2.5D networks: ``2 context + 1`` neighbouring slices in, edge
   slices repeated), in batches, or in overlapping slabs of whole slices (the 3D network:
   :func:`predict_volume_3d`), bf16 autocast on CPU.
4. The network predicts a correction added to the CBCT; when the grid was resampled, only the
   correction is resampled back (linear), so the CBCT's own detail on the source grid is kept.
5. Undo the reorientation: the sCT lies on the CBCT's grid, ``(k, j, i)``.

Weights files (``torch.save`` of a plain dict, read with ``weights_only=True``): ``format``
(:data:`WEIGHTS_FORMAT`), ``network`` (the architecture config), ``state_dict`` (fp16),
``spacing_range_mm`` (``{"slice": [lo, hi], "in_plane": [lo, hi]}``), ``training`` (facts).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from scipy import ndimage

from models.devices import resolve_device
from models.errors import InputRejected, PipelineFailed
from models.networks.glfc import HU_SCALE, SCTUNet, build_network
from models.networks.selective_scan import backend_for
from models.pipelines.segment.geometry import reorientation
from models.result import ProgressCallback, no_progress
from models.training.sct_data import AIR_HU, CANONICAL
from models.volume import Volume

WEIGHTS_FORMAT = "voxelgate-sct/1"
"""Format tag of the weights files this module reads."""

SIZE_MULTIPLE = 8
"""Slices are padded with air to a multiple of this (three 2x poolings)."""


def load_weights(path: Path, device: torch.device) -> tuple[SCTUNet, dict[str, Any]]:
    """Build the network a weights file describes and load it (eval mode, float32).

    Args:
        path: The weights file.
        device: Where to put the network.

    Returns:
        ``(network, record)``: the network and the file's dict without ``state_dict``.

    Raises:
        InputRejected: Missing file, another format, or weights that do not fit the network.
    """
    if not Path(path).is_file():
        raise InputRejected(f"cbct-to-sct weights {path} are not installed")
    record = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(record, dict) or record.get("format") != WEIGHTS_FORMAT:
        raise InputRejected(f"{path} is not a {WEIGHTS_FORMAT} weights file")
    try:
        network = build_network(record["network"])
        network.load_state_dict({k: v.float() for k, v in record["state_dict"].items()})
    except (KeyError, ValueError, RuntimeError) as exc:
        raise InputRejected(f"{path}: the weights do not fit their network config: {exc}") from None
    info = {k: v for k, v in record.items() if k != "state_dict"}
    return network.to(device).eval(), info


def weights_record(
    network_config: dict[str, Any],
    state_dict: dict[str, torch.Tensor],
    spacing_range_mm: dict[str, list[float]],
    training: dict[str, Any],
) -> dict[str, Any]:
    """The dict a weights file holds (fp16 tensors), for ``torch.save``.

    :func:`load_weights` reads the saved file back.

    Args:
        network_config: Architecture config (:data:`models.networks.glfc.DEFAULT_CONFIGS`).
        state_dict: Network weights.
        spacing_range_mm: Spacing the network was trained on, ``{"slice": [lo, hi],
            "in_plane": [lo, hi]}`` (mm).
        training: JSON-compatible facts (data, steps, metrics).
    """
    return {
        "format": WEIGHTS_FORMAT,
        "network": dict(network_config),
        "state_dict": {k: v.detach().to(torch.float16).cpu() for k, v in state_dict.items()},
        "spacing_range_mm": spacing_range_mm,
        "training": training,
    }


def _network_input(
    cbct_hu: npt.NDArray[np.float32], axial_pad: tuple[int, int], device: torch.device
) -> torch.Tensor:
    """The canonical CBCT in network units, padded for the network.

    Args:
        cbct_hu: ``(K, H, W)`` HU.
        axial_pad: Slices added before and after (edge slices repeated).
        device: Where the tensor goes.

    Returns:
        ``(K + pads, H', W')`` float32 with ``H'``, ``W'`` the next multiples of
        :data:`SIZE_MULTIPLE` (the added rows and columns are air).
    """
    h, w = cbct_hu.shape[1:]
    ph, pw = (-h) % SIZE_MULTIPLE, (-w) % SIZE_MULTIPLE
    padded = np.pad(
        np.asarray(cbct_hu, np.float32) / HU_SCALE, (axial_pad, (0, ph), (0, pw)), mode="edge"
    )
    padded[:, h:, :] = AIR_HU / HU_SCALE
    padded[:, :, w:] = AIR_HU / HU_SCALE
    return torch.from_numpy(padded).to(device)


@torch.inference_mode()
def predict_volume(
    network: torch.nn.Module,
    cbct_hu: npt.NDArray[np.float32],
    context: int,
    *,
    batch: int = 16,
    bf16: bool = True,
    progress: ProgressCallback = no_progress,
) -> npt.NDArray[np.float32]:
    """Translate a canonical CBCT volume slice by slice.

    Args:
        network: The sCT network (eval mode).
        cbct_hu: CBCT in HU on the canonical grid, ``(K, H, W)`` (axial slices on axis 0).
        context: Neighbouring slices per side the network takes.
        batch: Slices per forward pass.
        bf16: bf16 autocast (CPU and CUDA).
        progress: Called with the fraction of slices done.

    Returns:
        sCT in HU, ``(K, H, W)`` float32.
    """
    device = next(network.parameters()).device
    k_n, h, w = cbct_hu.shape
    volume = _network_input(cbct_hu, (context, context), device)
    out = np.empty((k_n, h, w), np.float32)
    for start in range(0, k_n, batch):
        stop = min(start + batch, k_n)
        x = torch.stack([volume[k : k + 2 * context + 1] for k in range(start, stop)])
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            y = network(x)
        out[start:stop] = y[:, 0, :h, :w].float().cpu().numpy() * HU_SCALE
        progress(stop / k_n, "translate slices")
    return out


@torch.inference_mode()
def predict_volume_3d(
    network: torch.nn.Module,
    cbct_hu: npt.NDArray[np.float32],
    patch_slices: int,
    *,
    bf16: bool = True,
    progress: ProgressCallback = no_progress,
) -> npt.NDArray[np.float32]:
    """Translate a canonical CBCT volume with a 3D network, in overlapping slabs.

    Slabs of ``patch_slices`` whole slices (the training patch depth, so that GroupNorm sees
    inputs of the extent it was trained on) start every ``patch_slices / 2`` slices; each
    slab's central half is kept (the volume is padded by a quarter slab at both ends, edge
    slices repeated), so no kept slice lies within a quarter slab of a slab's edge.

    Args:
        network: The 3D sCT network (eval mode), ``(B, 1, D, H, W)`` in and out.
        cbct_hu: CBCT in HU on the canonical grid, ``(K, H, W)`` (axial slices on axis 0).
        patch_slices: Slab depth (a multiple of 4).
        bf16: bf16 autocast (CPU and CUDA).
        progress: Called with the fraction of slices done.

    Returns:
        sCT in HU, ``(K, H, W)`` float32.
    """
    if patch_slices % 4:
        raise InputRejected(f"patch_slices must be a multiple of 4, got {patch_slices}")
    device = next(network.parameters()).device
    k_n, h, w = cbct_hu.shape
    quarter, half = patch_slices // 4, patch_slices // 2
    n_slabs = -(-k_n // half)
    tail = n_slabs * half + 2 * quarter - k_n - quarter
    volume = _network_input(cbct_hu, (quarter, tail), device)
    out = np.empty((n_slabs * half, h, w), np.float32)
    for i in range(n_slabs):
        x = volume[i * half : i * half + patch_slices][None, None]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            y = network(x)
        kept = y[0, 0, quarter : quarter + half, :h, :w].float().cpu().numpy()
        out[i * half : (i + 1) * half] = kept * HU_SCALE
        progress(min((i + 1) * half, k_n) / k_n, "translate slabs")
    return out[:k_n]


def predict_canonical(
    network: torch.nn.Module,
    network_config: dict[str, Any],
    cbct_hu: npt.NDArray[np.float32],
    *,
    bf16: bool = True,
    progress: ProgressCallback = no_progress,
) -> npt.NDArray[np.float32]:
    """Translate a canonical CBCT volume with a 2.5D or 3D network (by its config).

    Args:
        network: The sCT network (eval mode) built from ``network_config``.
        network_config: Its config (:data:`models.networks.glfc.DEFAULT_CONFIGS`).
        cbct_hu: CBCT in HU on the canonical grid, ``(K, H, W)``.
        bf16: bf16 autocast.
        progress: Called with the fraction done.

    Returns:
        sCT in HU, ``(K, H, W)`` float32.
    """
    if getattr(network, "dims", 2) == 3:
        depth = int(network_config["patch_slices"])
        return predict_volume_3d(network, cbct_hu, depth, bf16=bf16, progress=progress)
    context = int(network_config["context"])
    return predict_volume(network, cbct_hu, context, bf16=bf16, progress=progress)


def _network_spacing(
    spacing: tuple[float, float, float], ranges: dict[str, list[float]]
) -> tuple[float, float, float]:
    """Canonical spacing clipped into the trained range (slice axis, then in-plane axes)."""
    s_lo, s_hi = ranges["slice"]
    p_lo, p_hi = ranges["in_plane"]
    return (
        float(np.clip(spacing[0], s_lo, s_hi)),
        float(np.clip(spacing[1], p_lo, p_hi)),
        float(np.clip(spacing[2], p_lo, p_hi)),
    )


def _resample(array: npt.NDArray[np.float32], shape: tuple[int, ...]) -> npt.NDArray[np.float32]:
    """Linear resampling to ``shape`` (voxel edges aligned, edge values extended)."""
    if tuple(array.shape) == tuple(shape):
        return array
    factors = [n / o for n, o in zip(shape, array.shape, strict=True)]
    out = ndimage.zoom(array, factors, order=1, mode="nearest", grid_mode=True)
    if tuple(out.shape) != tuple(shape):  # pragma: no cover - zoom rounds shape itself
        raise PipelineFailed(f"resampling gave {out.shape}, expected {shape}")
    return np.asarray(out, np.float32)


def translate(
    cbct: Volume, weights: Path, device: str, progress: ProgressCallback = no_progress
) -> tuple[npt.NDArray[np.float32], dict[str, Any]]:
    """The learned sCT of a CBCT on the CBCT's own grid.

    Args:
        cbct: CBCT in HU, ``array[k, j, i]``, LPS affine, any orthogonal orientation.
        weights: The weights file.
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
        progress: Progress callback (fractions of the translation).

    Returns:
        ``(sct_hu, facts)``: sCT in HU, float32, shape of ``cbct.array``; facts: network,
        scan backend, source and network spacing (mm, canonical order), resampled or not,
        runtime (s).
    """
    clock = time.perf_counter()
    dev = torch.device(resolve_device(device))
    network, record = load_weights(weights, dev)
    reorient = reorientation(cbct.affine, CANONICAL)
    canonical = np.ascontiguousarray(reorient.apply(np.asarray(cbct.array, np.float32)))
    source_spacing = tuple(
        float(v) for v in np.linalg.norm(cbct.affine[:3, :3], axis=0)[list(reorient.perm)]
    )
    net_spacing = _network_spacing(
        (source_spacing[0], source_spacing[1], source_spacing[2]), record["spacing_range_mm"]
    )
    shape = tuple(
        max(1, round(n * s / t))
        for n, s, t in zip(canonical.shape, source_spacing, net_spacing, strict=True)
    )
    resampled = shape != canonical.shape
    net_in = _resample(canonical, shape)
    net_out = predict_canonical(network, record["network"], net_in, progress=progress)
    correction = _resample(net_out - net_in, canonical.shape)
    sct = reorient.invert(canonical + correction)
    facts = {
        "network": record["network"],
        "scan_backend": backend_for(dev),
        "device": dev.type,
        "source_spacing_mm": [round(v, 4) for v in source_spacing],
        "network_spacing_mm": [round(v, 4) for v in net_spacing],
        "resampled": resampled,
        "trained_spacing_range_mm": record["spacing_range_mm"],
        "runtime_s": round(time.perf_counter() - clock, 3),
    }
    return np.asarray(sct, np.float32), facts
