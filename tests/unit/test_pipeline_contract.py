"""Contract tests every registry entry passes, on one small real CT (design rule 11).

Input: the real TotalSegmentator example CT (``example_ct_sm.nii.gz``, 122×101×30 at 3 mm,
HU), read as the service reads NIfTI. Each pipeline runs with its default parameters except
the few named in :data:`FAST` that only shorten the work (iterations, view counts). Every
pipeline must:

* return outputs named in its registry record, each on the input grid (shape, affine, frame of
  reference) for an image input;
* stamp provenance with its own name, version and weights hash (the registry's when it has
  weights: for ``segment`` that of its default model, which the run picks);
* report progress as non-decreasing fractions in [0, 1] that end at 1, and stop with
  :class:`~models.errors.Cancelled` when the callback raises it;
* return JSON-compatible measurements and uint8 RGB figures.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from models.errors import Cancelled, InputRejected
from models.pipelines.segment.card import installed_models
from models.registry import all_specs, load_pipeline, validate_params
from models.volume import Volume
from service.io.nifti import read_nifti

CT = Path(__file__).resolve().parents[3] / "shared" / "data" / "totalsegmentator"
FAST: dict[str, dict[str, Any]] = {
    "zeroshot-denoise": {"max_iterations": 30, "min_iterations": 10, "device": "cpu"},
    "sparse-view-ct": {"method": "fbp", "views": 36, "device": "cpu"},
    "segment": {"device": "cpu", "bf16": True, "overlap": 0.25},
}
"""Per pipeline: parameters that only make the run short (the rest stay default)."""


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Any:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def image() -> Volume:
    path = CT / "example_ct_sm.nii.gz"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    # NIfTI carries no modality: the service takes it from the upload; this file is CT in HU
    return dataclasses.replace(read_nifti(path), modality="CT", units="HU")


def _runnable(name: str) -> None:
    if name == "segment" and not installed_models():
        pytest.skip("no segmentation model installed")


@pytest.mark.parametrize("spec", all_specs(), ids=lambda s: s.name)
def test_pipeline_contract(spec: Any, image: Volume) -> None:
    _runnable(spec.name)
    params = validate_params(spec, FAST.get(spec.name, {}))
    reports: list[tuple[float, str]] = []
    result = load_pipeline(spec)({"image": image}, params, lambda f, s: reports.append((f, s)))

    outputs = {**result.volumes, **result.label_maps}
    assert outputs, spec.name
    assert set(outputs) <= set(spec.outputs), (spec.name, set(outputs))
    for name, out in outputs.items():
        assert out.shape == image.shape, (spec.name, name)
        np.testing.assert_allclose(out.affine, image.affine, atol=1e-6)
        assert out.frame_of_reference_uid == image.frame_of_reference_uid
        if name in result.volumes:
            assert np.isfinite(out.array).all(), (spec.name, name)

    prov = result.provenance
    assert (prov.pipeline, prov.version) == (spec.name, spec.version)
    if spec.weights is not None:
        assert prov.weights_sha256 == spec.weights_sha256()
        assert len(prov.weights_sha256) == 64
    else:
        assert prov.weights_sha256 == "none"

    fractions = [f for f, _ in reports]
    assert fractions, spec.name
    assert all(0.0 <= f <= 1.0 for f in fractions)
    assert fractions == sorted(fractions), (spec.name, reports)
    assert fractions[-1] == 1.0
    json.dumps(result.measurements)
    for figure in result.figures:
        assert figure.rgb.dtype == np.uint8
        assert figure.rgb.ndim == 3
        assert figure.rgb.shape[2] == 3
        assert figure.caption


@pytest.mark.parametrize("spec", all_specs(), ids=lambda s: s.name)
def test_pipeline_stops_when_cancelled(spec: Any, image: Volume) -> None:
    _runnable(spec.name)
    params = validate_params(spec, FAST.get(spec.name, {}))
    calls = []

    def cancel(fraction: float, step: str) -> None:
        calls.append(step)
        if len(calls) == 2:
            raise Cancelled("cancelled by the test")

    with pytest.raises(Cancelled):
        load_pipeline(spec)({"image": image}, params, cancel)
    assert len(calls) == 2


@pytest.mark.parametrize("spec", all_specs(), ids=lambda s: s.name)
def test_pipeline_refuses_a_missing_image(spec: Any) -> None:
    _runnable(spec.name)
    params = validate_params(spec, FAST.get(spec.name, {}))
    with pytest.raises(InputRejected):
        load_pipeline(spec)({}, params, lambda f, s: None)
