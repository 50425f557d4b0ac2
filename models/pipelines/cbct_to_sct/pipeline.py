"""``cbct-to-sct``: a synthetic CT (sCT) in HU from a CBCT, evaluated against a planning CT.

Steps (each named in the progress reports):

1. **check inputs**: ``inputs["image"]`` is the CBCT (CT in HU); ``inputs["reference"]``, when
   given, a planning CT in the same frame of reference (:mod:`.reference`: refused in another
   frame or without overlap; resampled trilinearly onto the CBCT grid when its grid differs).
2. **field of view** estimated from the CBCT alone, with the truncation check (:mod:`.fov`).
3. **method**: ``identity`` (the CBCT), ``hu-calibration`` (:mod:`.calibration`, shipped
   reference distribution, never the planning CT) or ``learned`` (the trained network,
   ``models.pipelines.cbct_to_sct.learned.translate``). Outside the field of view the sCT is
   air (-1000 HU) unless ``outside_fov="keep"``.
4. **metrics** against the reference (:mod:`.metrics`) for the CBCT and the sCT, in the
   reference body inside the field of view.
5. **figure** (:mod:`.figures`) and the ``body`` and ``fov`` label maps.

Every output is on the CBCT grid (shape, affine ``(k, j, i, 1)`` -> LPS mm, frame of
reference).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from models.errors import InputRejected
from models.labels import CodedTerm, LabelInfo, LabelMap
from models.pipelines.cbct_to_sct.calibration import calibrate, load_reference
from models.pipelines.cbct_to_sct.figures import difference_figure
from models.pipelines.cbct_to_sct.fov import FieldOfView, estimate_fov
from models.pipelines.cbct_to_sct.masks import HU_LIMITS, axial_axis, body_mask
from models.pipelines.cbct_to_sct.metrics import evaluation_mask, image_metrics, metric_definitions
from models.pipelines.cbct_to_sct.params import HU_REFERENCE, NETWORK_WEIGHTS, CBCTToSCTParams
from models.pipelines.cbct_to_sct.reference import AlignedReference, align_reference
from models.provenance import file_sha256
from models.registry import provenance_for
from models.result import ProgressCallback, Result
from models.sinogram import Sinogram
from models.volume import Volume

NAME = "cbct-to-sct"
OUTPUT = "sct"
"""Name of the output volume."""

MODELS_DIR = Path(__file__).resolve().parents[2]
"""The ``models`` package folder (weights and the HU reference are relative to it)."""

AIR_HU = -1000.0
"""What ``outside_fov="air"`` writes outside the CBCT field of view."""

_ANATOMY = CodedTerm("123037004", "SCT", "Anatomical Structure")
_BODY = CodedTerm("38266002", "SCT", "Entire body")
BODY_IN_FOV = LabelInfo(1, "Body inside CBCT field of view", _ANATOMY, _BODY, (0, 200, 0))
BODY_OUT_FOV = LabelInfo(2, "Body outside CBCT field of view", _ANATOMY, _BODY, (255, 80, 0))
FOV_IN = LabelInfo(1, "Inside CBCT field of view", colour=(0, 120, 255))
FOV_OUT = LabelInfo(2, "Outside CBCT field of view (not measured)", colour=(255, 0, 255))


def check_cbct(image: Volume | Sinogram | None) -> Volume:
    """The CBCT input, or a clear refusal.

    Raises:
        InputRejected: Missing, not a volume, not CT, not in HU, or non-finite voxels.
    """
    if not isinstance(image, Volume):
        raise InputRejected("cbct-to-sct needs the CBCT volume under inputs['image']")
    if image.modality not in ("CT", "OT"):
        raise InputRejected(f"the CBCT must be a CT image, got modality {image.modality!r}")
    if image.units != "HU":
        raise InputRejected(
            f"the CBCT is not in HU (units {image.units!r}): cbct-to-sct needs a CBCT whose "
            "voxels are Hounsfield units (DICOM Rescale Slope/Intercept to HU, or a NIfTI "
            "declared as HU); raw or uncalibrated CBCT values cannot be mapped"
        )
    if not np.issubdtype(image.array.dtype, np.number) or not np.all(np.isfinite(image.array)):
        raise InputRejected("the CBCT contains non-numeric, NaN or infinite voxels")
    return image


def _learned(
    cbct: Volume, params: CBCTToSCTParams, progress: ProgressCallback
) -> tuple[npt.NDArray[np.float32], dict[str, Any], str]:
    """The learned network's sCT, its facts and the weights' sha256."""
    relative = NETWORK_WEIGHTS[params.network]
    weights = MODELS_DIR / relative
    if not weights.is_file():
        raise InputRejected(
            f"method 'learned' needs the trained network ({relative}), which is not "
            "installed; use method 'hu-calibration' or 'identity'"
        )
    from models.devices import resolve_device
    from models.pipelines.cbct_to_sct.learned import translate

    def sub(fraction: float, step: str) -> None:
        progress(0.2 + 0.6 * min(max(fraction, 0.0), 1.0), step)

    sct, facts = translate(cbct, weights, resolve_device(params.device), sub)
    facts["clipped_to_hu"] = list(HU_LIMITS)  # as hu-calibration's curve is
    sct = np.clip(np.asarray(sct, dtype=np.float32), *HU_LIMITS)
    return sct, dict(facts), file_sha256(weights)


def translate_cbct(
    cbct: Volume,
    fov: FieldOfView,
    axis: int,
    params: CBCTToSCTParams,
    progress: ProgressCallback,
) -> tuple[npt.NDArray[np.float32], dict[str, Any], str | None]:
    """Run ``params.method``; returns ``(sct, facts, weights sha256 or None)``.

    The sCT is float32 HU on the CBCT grid, ``(K, J, I)``, before the outside-FOV rule.
    """
    progress(0.2, params.method)
    if params.method == "identity":
        return np.array(cbct.array, dtype=np.float32), {"method": "the CBCT unchanged"}, None
    if params.method == "hu-calibration":
        body = body_mask(cbct.array, params.body_threshold_hu, axis, within=fov.mask)
        table = load_reference(MODELS_DIR / HU_REFERENCE)
        sct, facts = calibrate(cbct.array, body, table)
        return sct, facts, None
    return _learned(cbct, params, progress)


def _evaluate(
    cbct: Volume,
    sct: npt.NDArray[np.float32],
    ref: AlignedReference,
    fov: FieldOfView,
    axis: int,
    threshold: float,
) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.bool_], dict[str, Any]]:
    """Reference body, evaluation mask and the metrics of the CBCT and the sCT."""
    body, mask, mask_facts = evaluation_mask(ref.hu, fov.mask, ref.valid, threshold, axis)
    before = image_metrics(cbct.array, ref.hu, mask)
    after = image_metrics(sct, ref.hu, mask)
    reduction = None
    if before["mae_hu"] and after["mae_hu"] is not None:
        reduction = round(100.0 * (1.0 - after["mae_hu"] / before["mae_hu"]), 2)
    return (
        body,
        mask,
        {
            "mask": mask_facts,
            "definitions": metric_definitions(),
            "cbct": before,
            "sct": after,
            "mae_reduction_pct": reduction,
        },
    )


def _label_maps(
    cbct: Volume, body: npt.NDArray[np.bool_], fov: npt.NDArray[np.bool_], with_outside: bool
) -> dict[str, LabelMap]:
    """``body`` (inside / outside the FOV) and ``fov`` (inside / outside) on the CBCT grid."""
    body_labels = np.zeros(cbct.shape, dtype=np.uint8)
    body_labels[body & fov] = BODY_IN_FOV.value
    infos = [BODY_IN_FOV]
    if with_outside:
        body_labels[body & ~fov] = BODY_OUT_FOV.value
        infos.append(BODY_OUT_FOV)
    fov_labels = np.where(fov, FOV_IN.value, FOV_OUT.value).astype(np.uint8)
    fov_infos = (FOV_IN, FOV_OUT) if not fov.all() else (FOV_IN,)
    return {
        "body": LabelMap.on_grid(cbct, body_labels, tuple(infos)),
        "fov": LabelMap.on_grid(cbct, fov_labels, fov_infos),
    }


def run(
    inputs: Mapping[str, Volume | Sinogram], params: CBCTToSCTParams, progress: ProgressCallback
) -> Result:
    """Convert ``inputs["image"]`` (a CBCT) to a synthetic CT; evaluate it against a reference.

    Args:
        inputs: ``{"image": CBCT}`` and optionally ``"reference"``: the planning CT (HU, same
            frame of reference; any grid overlapping the CBCT).
        params: Validated parameters.
        progress: ``callback(fraction, step)``; may raise ``Cancelled``.

    Returns:
        Result with ``volumes["sct"]`` (float32 HU on the CBCT grid, modality CT, derived from
        the CBCT), label maps ``body`` and ``fov``, measurements (method, runtime, field of
        view and truncation, method facts, reference handling and metrics of the CBCT and the
        sCT), the ``difference`` figure and provenance (weights sha256 for ``learned``; the HU
        reference table's sha256 in the parameters for ``hu-calibration``).

    Raises:
        InputRejected: See :func:`check_cbct` and
            :func:`~models.pipelines.cbct_to_sct.reference.align_reference`; ``learned``
            without shipped weights.
    """
    started = time.perf_counter()
    progress(0.0, "checking inputs")
    cbct = check_cbct(inputs.get("image"))
    raw_reference = inputs.get("reference")
    ref = None
    if raw_reference is not None:
        if not isinstance(raw_reference, Volume):
            raise InputRejected("inputs['reference'] must be a CT volume")
        ref = align_reference(raw_reference, cbct)
    axis = axial_axis(cbct)
    threshold = params.body_threshold_hu
    progress(0.1, "field of view")
    fov = estimate_fov(cbct, axis, threshold, params.fov_padding_hu)
    sct, method_facts, weights_sha = translate_cbct(cbct, fov, axis, params, progress)
    if sct.shape != cbct.shape or not np.all(np.isfinite(sct)):
        raise InputRejected(f"method {params.method!r} returned a bad array {sct.shape}")
    if params.outside_fov == "air":
        sct[~fov.mask] = AIR_HU
    progress(0.8, "metrics")
    measurements: dict[str, Any] = {
        "method": params.method,
        "units": "HU",
        "axial_axis": axis,
        "field_of_view": fov.facts,
        "outside_fov": params.outside_fov,
        "method_facts": method_facts,
        "reference": {"given": False} if ref is None else ref.facts,
    }
    if ref is not None:
        body, region, measurements["metrics"] = _evaluate(cbct, sct, ref, fov, axis, threshold)
        measurements["body_mask_source"] = "reference CT"
    else:
        body = body_mask(sct, threshold, axis, within=fov.mask)
        region = body
        measurements["body_mask_source"] = "sCT (no reference given)"
    progress(0.9, "figure")
    figure = difference_figure(cbct, sct, region, None if ref is None else ref.hu, extent=body)
    meta = {
        **cbct.meta,
        "derived_from": "CBCT",
        "pipeline": NAME,
        "description": f"Synthetic CT ({params.method}) from CBCT",
    }
    volume = cbct.with_array(sct, modality="CT", units="HU", meta=meta)
    provenance = provenance_for(NAME, params, cbct)
    extra: dict[str, Any] = {}
    if params.method == "hu-calibration":
        extra["hu_reference_sha256"] = method_facts["reference_sha256"]
    uids = list(provenance.input_uids)
    if raw_reference is not None and raw_reference.meta.get("series_instance_uid"):
        uids.append(str(raw_reference.meta["series_instance_uid"]))
    provenance = replace(
        provenance,
        weights_sha256=weights_sha or "none",  # identity and hu-calibration use no weights
        parameters={**provenance.parameters, **extra},
        input_uids=uids,
    )
    measurements["runtime_s"] = round(time.perf_counter() - started, 3)
    progress(1.0, "done")
    return Result(
        volumes={OUTPUT: volume},
        measurements=_json_safe(measurements),
        figures=[figure],
        provenance=provenance,
        label_maps=_label_maps(cbct, body, fov.mask, with_outside=ref is not None),
    )


def _json_safe(value: Any) -> Any:
    """Replace non-finite floats by None, recursively (JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value
