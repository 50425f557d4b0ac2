"""``cbct-to-sct`` end to end on a CBCT simulated from a held-out real CT.

Refusals (not HU, another frame of reference, no overlap, learned without weights), the
reference resampled from another grid of the same frame, outputs on the CBCT grid, the FOV
label map and the outside-FOV rule, and identity metrics against a direct computation.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from models.errors import InputRejected
from models.pipelines.cbct_to_sct.masks import body_mask
from models.pipelines.cbct_to_sct.metrics import mae_hu, psnr_db, ssim_in_mask
from models.pipelines.cbct_to_sct.params import (
    DEFAULT_NETWORK,
    LEARNED_WEIGHTS,
    NETWORK_WEIGHTS,
    CBCTToSCTParams,
)
from models.pipelines.cbct_to_sct.pipeline import AIR_HU, run
from models.registry import get_spec, validate_params
from models.volume import Volume
from tests.unit.cbct_to_sct_data import FRAME, full_ct, simulated, small_ct


def _quiet(fraction: float, step: str) -> None:
    pass


@pytest.fixture(scope="module")
def truncated() -> tuple[Volume, np.ndarray]:
    cbct, fov = simulated("truncated")
    return cbct, np.asarray(fov.array, dtype=bool)


@pytest.fixture(scope="module")
def identity(truncated):
    cbct, _ = truncated
    return run({"image": cbct, "reference": small_ct()}, CBCTToSCTParams(method="identity"), _quiet)


def test_identity_metrics_equal_a_direct_computation(identity, truncated):
    cbct, true_fov = truncated
    ct = np.asarray(small_ct().array)
    body = body_mask(ct, -500.0, 0)
    mask = body & true_fov  # the estimated FOV equals the simulator's here
    metrics = identity.measurements["metrics"]
    assert metrics["mask"]["voxels"] == int(mask.sum())
    raw = np.asarray(cbct.array)
    for key in ("cbct", "sct"):  # identity: the sCT is the CBCT inside the FOV
        assert metrics[key]["mae_hu"] == pytest.approx(mae_hu(raw, ct, mask), abs=0.01)
        assert metrics[key]["psnr_db"] == pytest.approx(psnr_db(raw, ct, mask), abs=1e-3)
        assert metrics[key]["ssim"] == pytest.approx(ssim_in_mask(raw, ct, mask), abs=1e-4)
    assert metrics["mae_reduction_pct"] == 0.0
    frac = (body & ~true_fov).sum() / body.sum()
    assert metrics["mask"]["body_fraction_outside_fov"] == pytest.approx(frac, abs=1e-4)
    assert metrics["definitions"]["hu_clip"] == [-1024.0, 3000.0]
    json.dumps(identity.measurements)


def test_outputs_stay_on_the_cbct_grid_and_flag_the_outside_of_the_fov(identity, truncated):
    cbct, true_fov = truncated
    sct = identity.volumes["sct"]
    assert sct.shape == cbct.shape
    assert sct.array.dtype == np.float32
    np.testing.assert_array_equal(sct.affine, cbct.affine)
    assert sct.frame_of_reference_uid == FRAME
    assert (sct.modality, sct.units) == ("CT", "HU")
    assert sct.meta["derived_from"] == "CBCT"
    assert "identity" in sct.meta["description"]
    assert np.all(sct.array[~true_fov] == AIR_HU)
    np.testing.assert_array_equal(sct.array[true_fov], np.asarray(cbct.array)[true_fov])
    fov = identity.label_maps["fov"]
    assert {lab.name for lab in fov.labels} == {
        "Inside CBCT field of view",
        "Outside CBCT field of view (not measured)",
    }
    np.testing.assert_array_equal(fov.array == 2, ~true_fov)
    body = identity.label_maps["body"]
    assert body.frame_of_reference_uid == FRAME
    counts = body.volumes_ml()
    assert counts["Body outside CBCT field of view"].voxel_count > 0  # truncated shoulders
    assert identity.measurements["field_of_view"]["truncated"] is True
    figure = identity.figures[0]
    assert figure.rgb.dtype == np.uint8
    assert figure.rgb.shape[2] == 3
    assert "300 HU" in figure.caption
    assert "sCT - reference" in figure.caption


def test_keep_leaves_the_method_output_outside_the_fov(truncated):
    cbct, _true_fov = truncated
    result = run({"image": cbct}, CBCTToSCTParams(method="identity", outside_fov="keep"), _quiet)
    np.testing.assert_array_equal(result.volumes["sct"].array, np.asarray(cbct.array))
    assert "metrics" not in result.measurements
    assert result.measurements["reference"] == {"given": False}
    assert [lab.value for lab in result.label_maps["body"].labels] == [1]


def test_not_hu_is_refused(truncated):
    cbct, _ = truncated
    raw = dataclasses.replace(cbct, units="")
    with pytest.raises(InputRejected, match="not in HU"):
        run({"image": raw}, CBCTToSCTParams(), _quiet)
    with pytest.raises(InputRejected, match="reference must be a planning CT in HU"):
        run({"image": cbct, "reference": dataclasses.replace(small_ct(), units="")},
            CBCTToSCTParams(), _quiet)  # fmt: skip
    with pytest.raises(InputRejected, match="CBCT volume under inputs"):
        run({}, CBCTToSCTParams(), _quiet)


def test_a_planning_ct_in_another_frame_of_reference_is_refused(truncated):
    cbct, _ = truncated
    other = dataclasses.replace(small_ct(), frame_of_reference_uid="1.2.3.999")
    with pytest.raises(InputRejected, match=r"another frame of reference.*register it"):
        run({"image": cbct, "reference": other}, CBCTToSCTParams(), _quiet)


def test_an_unknown_frame_of_reference_is_said(truncated):
    cbct, _ = truncated
    unknown = dataclasses.replace(small_ct(), frame_of_reference_uid="")
    result = run({"image": cbct, "reference": unknown}, CBCTToSCTParams(method="identity"), _quiet)
    assert result.measurements["reference"]["frame_of_reference"].startswith("not verifiable")


def test_a_reference_that_does_not_overlap_is_refused(truncated):
    cbct, _ = truncated
    ct = small_ct()
    far = ct.affine.copy()
    far[:3, 3] += [0.0, 0.0, 5000.0]  # 5 m superior
    with pytest.raises(InputRejected, match="does not overlap"):
        run({"image": cbct, "reference": dataclasses.replace(ct, affine=far)},
            CBCTToSCTParams(), _quiet)  # fmt: skip


def test_a_reference_on_a_flipped_grid_is_resampled_exactly(identity, truncated):
    cbct, _ = truncated
    ct = small_ct()
    affine = ct.affine.copy()  # the same voxels stored in reverse slice order
    affine[:3, 3] = ct.index_to_lps([ct.shape[0] - 1, 0, 0])
    affine[:3, 0] *= -1.0
    flipped = dataclasses.replace(ct, array=np.ascontiguousarray(ct.array[::-1]), affine=affine)
    result = run({"image": cbct, "reference": flipped}, CBCTToSCTParams(method="identity"), _quiet)
    facts = result.measurements["reference"]
    assert facts["resampled"] is True
    assert facts["coverage_fraction"] == 1.0
    assert result.measurements["metrics"]["sct"] == identity.measurements["metrics"]["sct"]


def test_a_reference_on_a_finer_grid_is_resampled_onto_the_cbct(identity, truncated):
    cbct, _ = truncated
    result = run(
        {"image": cbct, "reference": full_ct()}, CBCTToSCTParams(method="identity"), _quiet
    )
    facts = result.measurements["reference"]
    assert facts["resampled"] is True
    assert "trilinear" in facts["interpolation"]
    assert facts["source_shape"] == [128, 128, 128]
    fine = result.measurements["metrics"]["sct"]
    coarse = identity.measurements["metrics"]["sct"]
    # trilinear samples of the 2x finer CT instead of its 2x2x2 block means: close, not equal
    assert fine["mae_hu"] == pytest.approx(coarse["mae_hu"], rel=0.15)
    assert fine["mask_voxels"] == pytest.approx(coarse["mask_voxels"], rel=0.1)


def test_learned_without_weights_is_refused_and_registry_record(truncated, monkeypatch):
    cbct, _ = truncated
    monkeypatch.setitem(NETWORK_WEIGHTS, "unet3d", "weights/cbct_to_sct/missing/model.pt")
    with pytest.raises(InputRejected, match="not installed"):
        run({"image": cbct}, CBCTToSCTParams(method="learned", network="unet3d"), _quiet)
    spec = get_spec("cbct-to-sct")
    assert [(i.name, i.required) for i in spec.inputs] == [("image", True), ("reference", False)]
    assert spec.weights == LEARNED_WEIGHTS == NETWORK_WEIGHTS[DEFAULT_NETWORK]
    assert len(spec.weights_sha256()) == 64
    assert spec.queue == "gpu"
    assert validate_params(spec, {}).method == "learned"  # type: ignore[attr-defined]
    assert "## Learned model" in spec.card_text()


def test_hu_calibration_stamps_the_reference_table_in_the_provenance(truncated):
    cbct, _ = truncated
    steps: list[tuple[float, str]] = []
    params = CBCTToSCTParams(method="hu-calibration")
    result = run({"image": cbct, "reference": small_ct()}, params,
                 lambda f, s: steps.append((f, s)))  # fmt: skip
    prov = result.provenance
    assert (prov.pipeline, prov.weights_sha256) == ("cbct-to-sct", "none")
    assert len(prov.parameters["hu_reference_sha256"]) == 64
    assert [s for _, s in steps][:3] == ["checking inputs", "field of view", "hu-calibration"]
    assert steps[-1] == (1.0, "done")
    metrics = result.measurements["metrics"]
    assert metrics["sct"]["mae_hu"] < metrics["cbct"]["mae_hu"]  # measured 193 -> 123 HU
