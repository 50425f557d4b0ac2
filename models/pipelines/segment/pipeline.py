"""``segment``: one CT/MR volume in, a label map on exactly the input grid out.

Steps (each named in the progress reports): load the model (card + weights, sha256 checked);
reorient the source to the card's canonical frame (axis permutation/flips only); resample the
image to the card's spacing (trilinear); intensity per card; sliding-window inference with
Gaussian blending; argmax on the network grid; labels back to the canonical grid by nearest
neighbour on the same geometry, then un-permuted onto the source grid (the input's shape and
affine); optional largest-component and hole-filling postprocessing on the source grid.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from models.devices import resolve_device
from models.errors import InputRejected
from models.labels import LabelMap
from models.pipelines.segment.card import MODELS_ROOT, ModelCard, resolve_model
from models.pipelines.segment.geometry import (
    grid_affine,
    nearest_back,
    network_shape,
    reorientation,
)
from models.pipelines.segment.inference import (
    BODY_HU,
    BODY_MARGIN_MM,
    Box,
    body_box,
    check_extent,
    fill_holes,
    largest_component,
    network_box,
    normalise,
    predict_classes,
    resample_image,
)
from models.pipelines.segment.networks import FinalOutput, MirroredOutput, load_network
from models.pipelines.segment.overlay import overlay_figure
from models.pipelines.segment.params import SegmentParams
from models.registry import provenance_for
from models.result import ProgressCallback, Result
from models.sinogram import Sinogram
from models.volume import Volume

OUTPUT = "segmentation"
"""Name of the output label map in the Result."""

CT_DISPLAY_WINDOW = (-160.0, 240.0)
"""Overlay window for CT, HU (soft tissue: width 400, level 40)."""


def display_window(image: Volume) -> tuple[float, float]:
    """CT: :data:`CT_DISPLAY_WINDOW`; other modalities: the 1st to 99th percentile."""
    if image.modality == "CT":
        return CT_DISPLAY_WINDOW
    lo, hi = (float(v) for v in np.percentile(image.array, [1.0, 99.0]))
    return lo, hi if hi > lo else lo + 1.0


def segment_volume(
    image: Volume,
    card: ModelCard,
    network: FinalOutput,
    params: SegmentParams,
    progress: ProgressCallback,
) -> tuple[LabelMap, dict[str, object]]:
    """Segment one volume with a loaded model.

    For a CT model with ``params.crop_body``, the body's bounding box is found on the
    canonical HU image (:func:`~models.pipelines.segment.inference.body_box`: > -500 HU,
    opened, 10 mm margin) and inference runs only on the network-grid voxels those canonical
    voxels read their labels from; every other voxel is background (0). The image is
    normalised in chunks into one float32 array (no further full-size float copy when the
    network grid is the canonical grid, where only the box is normalised), and the logits are
    streamed (never a full ``(C, D0, D1, D2)`` buffer).

    Args:
        image: Source volume, ``array[k, j, i]``, affine ``(k, j, i, 1)`` -> LPS mm; CT in HU.
        card: The model's card (canonical frame, spacing, intensity, window, labels).
        network: The loaded network on its device.
        params: Overlap, sw_batch, bf16, test-time mirroring, body cropping and
            postprocessing flags.
        progress: Progress callback.

    Returns:
        ``(label_map, facts)``: the label map on exactly ``image``'s grid (shape, affine, frame
        of reference) with the card's labels, and JSON-compatible facts about the grids
        (``body_crop``: whether it applied, and the boxes as ``[start, stop)`` voxel indices
        per axis of the canonical and the network grid).
    """
    device = next(network.parameters(), torch.zeros(())).device.type
    reo = reorientation(image.affine, card.orientation)
    canonical = reo.apply(image.array)  # a view, canonical axis order
    canon_affine = reo.affine(image.affine, image.shape)
    canon_spacing = tuple(float(s) for s in np.linalg.norm(canon_affine[:3, :3], axis=0))
    net_shape = network_shape(canonical.shape, canon_spacing, card.spacing_mm)
    padded = check_extent(net_shape, card.patch_size)
    progress(0.1, "preprocess")
    full: Box = ((0, net_shape[0]), (0, net_shape[1]), (0, net_shape[2]))
    box, crop_facts = full, None
    if not params.crop_body:
        crop_facts = {"applied": False, "reason": "crop_body is off"}
    elif card.modality != "CT":
        crop_facts = {"applied": False, "reason": f"{card.modality} model (crop is CT only)"}
    else:
        body = body_box(canonical, (canon_spacing[0], canon_spacing[1], canon_spacing[2]))
        if body is None:
            crop_facts = {"applied": False, "reason": f"no voxel above {BODY_HU:g} HU"}
        else:
            box = network_box(body, canonical.shape, net_shape, card.patch_size)
            crop_facts = {
                "applied": True,
                "threshold_hu": BODY_HU,
                "margin_mm": BODY_MARGIN_MM,
                "canonical_box": [list(b) for b in body],
                "network_box": [list(b) for b in box],
                "network_fraction": round(
                    float(np.prod([b - a for a, b in box]) / np.prod(net_shape)), 4
                ),
            }
    inner = tuple(slice(a, b) for a, b in box)
    if tuple(canonical.shape) == net_shape:  # no resampling: normalise only the box
        inside = normalise(canonical[inner], card.intensity)
        x = resample_image(inside, (inside.shape[0], inside.shape[1], inside.shape[2]), device)
        del inside
    else:
        x = resample_image(normalise(canonical, card.intensity), net_shape, device)
        if box != full:
            x = x[(slice(None), slice(None), *inner)].contiguous()
    progress(0.2, "inference")
    classes_box = predict_classes(
        x,
        MirroredOutput(network, card) if params.mirroring else network,
        card.patch_size,
        overlap=params.overlap,
        sw_batch=params.sw_batch,
        bf16=params.bf16,
    )
    del x
    progress(0.85, "invert")
    classes: npt.NDArray[np.integer[Any]] = classes_box  # uint8 (<= 256 classes) or uint16
    if box != full:
        classes = np.zeros(net_shape, dtype=classes_box.dtype)
        classes[inner] = classes_box
    del classes_box
    if tuple(canonical.shape) != net_shape:
        classes = nearest_back(classes, canonical.shape)
    labels = reo.invert(classes)
    if params.largest_component:
        labels = largest_component(labels)
    if params.fill_holes:
        labels = fill_holes(labels)
    label_map = LabelMap.on_grid(image, labels, card.label_infos())
    net_affine = grid_affine(canon_affine, canonical.shape, net_shape)
    facts: dict[str, object] = {
        "canonical_orientation": card.orientation,
        "source_axes_to_canonical": {"perm": list(reo.perm), "flip": list(reo.flip)},
        "network_grid_shape": list(net_shape),
        "network_grid_spacing_mm": [float(s) for s in np.linalg.norm(net_affine[:3, :3], axis=0)],
        "padded_to_window": padded,
        "body_crop": crop_facts,
        "test_time_mirroring": (
            card.mirroring.model_dump(mode="json")
            if params.mirroring and card.mirroring is not None
            else None
        ),
    }
    return label_map, facts


def run(
    inputs: Mapping[str, Volume | Sinogram],
    params: SegmentParams,
    progress: ProgressCallback,
    *,
    models_root: Path | None = None,
) -> Result:
    """Segment ``inputs["image"]`` with the installed model ``params.model``.

    Args:
        inputs: ``{"image": Volume}`` (CT in HU or MR; any orientation, spacing, obliquity).
        params: Validated parameters.
        progress: Progress callback (may raise ``Cancelled``).
        models_root: Folder of installed models; default ``models/weights/segment`` (tests and
            tools pass their own folder here).

    Returns:
        A Result with the label map ``segmentation`` on the input grid, per-label volumes (mL)
        and voxel counts, timings, the ``overlay`` figure (three orthogonal slices) and
        provenance stamped with the model's weights sha256.

    Raises:
        InputRejected: No image, wrong modality, no or unknown model, a bad card, a volume too
            small for the window.
    """
    image = inputs.get("image")
    if not isinstance(image, Volume):
        raise InputRejected("segment needs an image volume under inputs['image']")
    root = MODELS_ROOT if models_root is None else models_root
    t0 = time.perf_counter()
    progress(0.0, "load model")
    card, network = load_network(
        root / resolve_model(params.model, root), resolve_device(params.device)
    )
    if image.modality not in (card.modality, "OT"):
        raise InputRejected(
            f"model {card.name} segments {card.modality} images, the input is {image.modality}"
        )
    label_map, facts = segment_volume(image, card, network, params, progress)
    runtime = time.perf_counter() - t0
    figure = overlay_figure(image, label_map, display_window(image))
    volumes = {
        name: {"value": v.value, "voxel_count": v.voxel_count, "volume_ml": round(v.volume_ml, 4)}
        for name, v in label_map.volumes_ml().items()
    }
    provenance = provenance_for("segment", params, image)
    provenance = replace(
        provenance,
        weights_sha256=card.weights.sha256,
        parameters={**provenance.parameters, "model": card.name, "model_version": card.version},
    )
    progress(1.0, "done")
    return Result(
        volumes={},
        measurements={
            "model": {"name": card.name, "version": card.version},
            "labels": volumes,
            "geometry": facts,
            "runtime_s": round(runtime, 3),
        },
        figures=[figure],
        provenance=provenance,
        label_maps={OUTPUT: label_map},
    )
