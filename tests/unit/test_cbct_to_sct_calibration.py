"""``hu-calibration``: the curve, the shipped reference table, and its effect on a simulated CBCT.

The CBCT is simulated with strong scatter and cupping from the held-out OpenKBP CT
``validation-pats/pt_201`` (``cbct_to_sct_data``); the reference table comes from the
training patients only, so the CT that scores the result never enters the calibration.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from models.errors import InputRejected
from models.pipelines.cbct_to_sct.calibration import (
    SLOPE_LIMITS,
    HUMapping,
    fit_mapping,
    load_reference,
)
from models.pipelines.cbct_to_sct.params import HU_REFERENCE, CBCTToSCTParams
from models.pipelines.cbct_to_sct.pipeline import MODELS_DIR, run
from service.cli import main
from tests.unit.cbct_to_sct_data import DATA, simulated, small_ct

SPLITS = DATA / "openkbp" / "splits.json"


def test_mapping_is_monotone_linear_beyond_its_ends_and_clipped():
    levels = np.linspace(0, 100, 201)
    source = np.percentile(np.random.default_rng(0).normal(-200, 150, 5000), levels)
    reference = np.percentile(np.random.default_rng(1).normal(0, 100, 5000), levels)
    m = fit_mapping(source, reference, levels)
    assert np.all(np.diff(m.knots_in) > 0)
    assert np.all(np.diff(m.knots_out) >= 0)
    x = np.linspace(-3000, 6000, 3001, dtype=np.float32)
    y = m.apply(x)
    assert np.all(np.diff(y) >= 0)
    assert y.min() == -1024.0
    assert y.max() == 3071.0
    # the knots hold: each source quantile goes to the reference quantile of its level
    mid = (levels >= 0.5) & (levels <= 99.5)
    np.testing.assert_allclose(m.apply(source[mid]), reference[mid], atol=0.05)
    # beyond the ends: straight lines of the stated slopes
    lo = m.knots_in[0] - np.array([10.0, 20.0])
    assert np.diff(m.apply(lo))[0] == pytest.approx(-10 * m.slope_low, rel=1e-4)
    assert SLOPE_LIMITS[0] <= m.slope_low <= SLOPE_LIMITS[1]


def test_equal_source_quantiles_become_one_knot():
    levels = np.linspace(0, 100, 11)
    source = np.array([-1000, -1000, -1000, 0, 0, 0, 10, 20, 30, 40, 50], dtype=np.float64)
    reference = np.linspace(-900, 100, 11)
    m = fit_mapping(source, reference, levels)
    assert len(m.knots_in) == len(np.unique(source[1:-1]))
    assert np.all(np.diff(m.knots_out) >= 0)
    flat = HUMapping(np.array([0.0, 1.0]), np.array([5.0, 5.0]), 1.0, 1.0)
    assert flat.apply(np.array([0.5]))[0] == 5.0


def test_shipped_reference_comes_from_training_patients_only():
    path = MODELS_DIR / HU_REFERENCE
    table = json.loads(path.read_text(encoding="utf-8"))
    ref = load_reference(path)
    assert ref.levels_pct.size == 201
    assert np.all(np.diff(ref.quantiles_hu) >= 0)
    assert -60.0 < float(np.interp(50.0, ref.levels_pct, ref.quantiles_hu)) < 40.0  # soft tissue
    if not SPLITS.is_file():
        pytest.skip(f"{SPLITS} not available")
    splits = json.loads(SPLITS.read_text(encoding="utf-8"))
    assert table["cases"]
    assert set(table["cases"]) <= set(splits["train-pats"])
    assert not set(table["cases"]) & set(splits["validation-pats"])
    assert table["n_cases"] == len(table["cases"])
    assert ref.provenance["body_threshold_hu"] == -500.0
    assert "cases" not in ref.provenance


def test_a_bad_reference_table_is_refused(tmp_path: Path):
    bad = tmp_path / "ref.json"
    bad.write_text(json.dumps({"levels_pct": [0, 50, 100], "quantiles_hu": [0, -5, 10],
                               "body_threshold_hu": -500}))  # fmt: skip
    with pytest.raises(InputRejected, match="non-decreasing"):
        load_reference(bad)
    with pytest.raises(InputRejected, match="unusable"):
        load_reference(tmp_path / "missing.json")


def test_hu_reference_command_reads_training_cts_only(tmp_path: Path, monkeypatch):
    if not SPLITS.is_file():
        pytest.skip(f"{SPLITS} not available")
    import service.io.nifti as nifti

    read: list[Path] = []
    original = nifti.read_nifti

    def spy(path: Path):
        read.append(Path(path))
        return original(path)

    monkeypatch.setattr(nifti, "read_nifti", spy)
    out = tmp_path / "ref.json"
    assert main(["dataset", "hu-reference", "--out", str(out), "--limit", "2", "-q"]) == 0
    assert len(read) == 2
    assert all(p.parent.parent.name == "train-pats" for p in read)
    table = load_reference(out)
    assert table.provenance["n_cases"] == 2
    assert "validation" in table.provenance["split"]


@pytest.fixture(scope="module")
def scatter_results():
    cbct, _ = simulated("scatter")
    ct = small_ct()
    out = {}
    for method in ("identity", "hu-calibration"):
        params = CBCTToSCTParams(method=method)
        out[method] = run({"image": cbct, "reference": ct}, params, lambda f, s: None)
    out["no-reference"] = run(
        {"image": cbct}, CBCTToSCTParams(method="hu-calibration"), lambda f, s: None
    )
    return out


def test_hu_calibration_more_than_halves_the_error_of_the_raw_cbct(scatter_results):
    before = scatter_results["identity"].measurements["metrics"]["sct"]
    after = scatter_results["hu-calibration"].measurements["metrics"]["sct"]
    # measured: MAE 313 -> 136 HU, PSNR 21.0 -> 26.5 dB, SSIM 0.76 -> 0.87
    assert before["mae_hu"] > 200.0
    assert after["mae_hu"] < 0.5 * before["mae_hu"]
    assert after["psnr_db"] > before["psnr_db"] + 3.0
    assert after["ssim"] > before["ssim"]
    assert after["mask_voxels"] == before["mask_voxels"] > 10000
    facts = scatter_results["hu-calibration"].measurements["method_facts"]
    assert facts["uses_planning_ct"] is False
    assert len(facts["reference_sha256"]) == 64


def test_hu_calibration_does_not_look_at_the_planning_ct(scatter_results):
    with_ref = scatter_results["hu-calibration"].volumes["sct"].array
    without = scatter_results["no-reference"].volumes["sct"].array
    assert np.array_equal(with_ref, without)
    assert "metrics" not in scatter_results["no-reference"].measurements
