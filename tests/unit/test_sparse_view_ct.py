"""The sparse-view-ct pipeline on a real CT (TotalSegmentator example_ct_sm), small sizes."""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import numpy as np
import pytest

from models.errors import InputRejected, InvalidParameters
from models.physics.lowdose import estimate_body_mask
from models.pipelines.sparse_view_ct import pipeline as pipeline_module
from models.pipelines.sparse_view_ct.metrics import psnr_db, ssim_in_mask, ssim_map
from models.pipelines.sparse_view_ct.params import SparseViewCTParams, resolve_method
from models.pipelines.sparse_view_ct.pipeline import run
from models.registry import get_spec, validate_params
from models.volume import Volume

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
SMALL_CT = DATA / "totalsegmentator" / "example_ct_sm.nii.gz"


def _quiet(fraction: float, step: str) -> None:
    """Progress callback that ignores everything."""


@pytest.fixture(scope="module")
def ct() -> Volume:
    """2 real axial CT slices, 2x2 block-averaged to 50 x 61 pixels of 6 mm (HU, LPS)."""
    if not SMALL_CT.exists():
        pytest.skip(f"{SMALL_CT} not available")
    from service.io.nifti import read_nifti

    vol = read_nifti(SMALL_CT)  # (30, 101, 122), 3 mm, modality OT (plain NIfTI)
    hu = vol.array[14:16, :100, :122].astype(np.float32)
    small = hu.reshape(2, 50, 2, 61, 2).mean(axis=(2, 4))
    affine = vol.affine @ np.diag([1.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = vol.index_to_lps([14.0, 0.5, 0.5])
    return Volume(small, affine, "CT", "HU", "1.2.3.4", {"series_instance_uid": "1.2.3"})


def _run(ct: Volume, **params: object) -> tuple[object, float]:
    start = time.perf_counter()
    result = run({"image": ct}, SparseViewCTParams(**params), _quiet)  # type: ignore[arg-type]
    return result, time.perf_counter() - start


@pytest.mark.parametrize("method", ["fbp", "sirt", "cgls", "tv"])
def test_each_method_runs_keeps_geometry_and_reports(ct, method):
    steps: list[float] = []
    result = run(
        {"image": ct},
        SparseViewCTParams(method=method, views=18, iterations=10),
        lambda f, s: steps.append(f),
    )
    out = result.volumes["reconstruction"]
    assert out.shape == ct.shape
    assert out.array.dtype == np.float32
    np.testing.assert_array_equal(out.affine, ct.affine)
    assert out.frame_of_reference_uid == ct.frame_of_reference_uid
    assert (out.modality, out.units) == ("CT", "HU")
    m = result.measurements
    assert (m["method"], m["views"]) == (method, 18)
    assert m["geometry"]["views"] == 18
    assert m["geometry"]["beam"] == "fan"
    assert len(m["residual_per_slice"]) == ct.shape[0]
    assert 0.0 < m["residual_mean"] < 1.0
    assert m["residual_mean"] == pytest.approx(np.mean(m["residual_per_slice"]))
    assert m["metric_window_hu"] == [-1000.0, 1000.0]
    assert math.isfinite(m["result_psnr_db"])
    assert 0.0 < m["result_ssim"] <= 1.0
    if method == "fbp":
        assert m["residual_per_slice"] == m["fbp_residual_per_slice"]
    else:  # iterative methods fit the data better than FBP does
        assert m["residual_mean"] < m["fbp_residual_mean"]
    (figure,) = result.figures
    assert figure.rgb.shape == (ct.shape[1], 3 * ct.shape[2], 3)
    assert "soft tissue" in figure.caption
    assert result.provenance.pipeline == "sparse-view-ct"
    assert result.provenance.parameters["views"] == 18
    assert result.provenance.input_uids == ["1.2.3"]
    assert steps == sorted(steps)
    assert steps[-1] == pytest.approx(1.0)


def test_sirt_and_tv_beat_fbp_at_18_views(ct):
    fbp, _ = _run(ct, method="fbp", views=18)
    sirt, _ = _run(ct, method="sirt", views=18, iterations=100)
    tv, _ = _run(ct, method="tv", views=18, iterations=100)
    base = fbp.measurements["result_psnr_db"]  # type: ignore[attr-defined]
    assert sirt.measurements["result_psnr_db"] > base + 3.0  # type: ignore[attr-defined]
    assert tv.measurements["result_psnr_db"] > base + 3.0  # type: ignore[attr-defined]
    assert tv.measurements["result_ssim"] > fbp.measurements["result_ssim"]  # type: ignore[attr-defined]


def test_more_views_give_better_fbp(ct):
    few, _ = _run(ct, method="fbp", views=18)
    many, _ = _run(ct, method="fbp", views=180)
    assert (
        many.measurements["result_psnr_db"]  # type: ignore[attr-defined]
        > few.measurements["result_psnr_db"] + 3.0  # type: ignore[attr-defined]
    )


def test_same_seed_same_noise_other_seed_differs(ct):
    a, _ = _run(ct, method="fbp", views=30, seed=1)
    b, _ = _run(ct, method="fbp", views=30, seed=1)
    c, _ = _run(ct, method="fbp", views=30, seed=2)
    arr = lambda r: r.volumes["reconstruction"].array  # noqa: E731
    np.testing.assert_array_equal(arr(a), arr(b))
    assert not np.array_equal(arr(a), arr(c))


# ------------------------------------------------------------------ bad input, before work


@pytest.fixture
def no_projection(monkeypatch):
    """Fail the test if the pipeline gets as far as building a projector."""

    def refuse(*args, **kwargs):
        raise AssertionError("heavy work started before the input was refused")

    monkeypatch.setattr(pipeline_module, "make_projector", refuse)


@pytest.mark.parametrize("views", [0, 3, 4097, 100000])
def test_absurd_view_counts_are_refused(views):
    with pytest.raises(InvalidParameters, match="views"):
        validate_params(get_spec("sparse-view-ct"), {"views": views})


def test_auto_method_is_learned_for_images_and_tv_for_projection_data():
    spec = get_spec("sparse-view-ct")
    assert validate_params(spec, {"method": "learned"}).method == "learned"
    assert validate_params(spec, {}).method == "auto"
    assert resolve_method("auto", projection_data=False) == "learned"
    assert resolve_method("auto", projection_data=True) == "tv"  # learned is refused there
    assert resolve_method("sirt", projection_data=False) == "sirt"


def test_unknown_parameter_gets_a_hint():
    with pytest.raises(InvalidParameters, match="did you mean 'views'"):
        validate_params(get_spec("sparse-view-ct"), {"view": 18})


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"modality": "MR", "units": ""}, "CT volume in HU"),
        ({"units": ""}, "CT volume in HU"),
    ],
)
def test_non_ct_is_refused(ct, no_projection, change, message):
    with pytest.raises(InputRejected, match=message):
        run({"image": dataclasses.replace(ct, **change)}, SparseViewCTParams(), _quiet)


def test_nan_is_refused(ct, no_projection):
    bad = ct.array.copy()
    bad[0, 10, 10] = np.nan
    with pytest.raises(InputRejected, match="NaN"):
        run({"image": ct.with_array(bad)}, SparseViewCTParams(), _quiet)


def test_too_few_pixels_are_refused(ct, no_projection):
    tiny = dataclasses.replace(ct, array=ct.array[:, :8, :8])
    with pytest.raises(InputRejected, match="too small"):
        run({"image": tiny}, SparseViewCTParams(), _quiet)


def test_non_square_pixels_are_refused(ct, no_projection):
    stretched = dataclasses.replace(ct, affine=ct.affine @ np.diag([1.0, 1.5, 1.0, 1.0]))
    with pytest.raises(InputRejected, match="square pixels"):
        run({"image": stretched}, SparseViewCTParams(), _quiet)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"source_to_isocentre_mm": 100.0}, r"source_to_isocentre_mm=100 puts the source inside"),
        (
            {"source_to_isocentre_mm": 800.0, "source_to_detector_mm": 700.0},
            "source_to_detector_mm=700 must exceed",
        ),
        ({"n_detectors": 8}, r"n_detectors=8 cannot cover .* use at least \d+"),
    ],
)
def test_geometry_that_cannot_cover_the_slice_says_what_to_change(
    ct, no_projection, params, message
):
    with pytest.raises(InputRejected, match=message):
        run({"image": ct}, SparseViewCTParams(**params), _quiet)


def test_explicit_geometry_is_used(ct):
    result, _ = _run(
        ct, method="fbp", views=24, detector="flat", source_to_isocentre_mm=900.0, n_detectors=400
    )
    g = result.measurements["geometry"]  # type: ignore[attr-defined]
    assert (g["detector"], g["source_to_isocentre_mm"], g["n_detectors"]) == ("flat", 900.0, 400)
    assert g["source_to_detector_mm"] == 1800.0


# ------------------------------------------------------------------ metrics


def test_ssim_matches_scikit_image(ct):
    metrics = pytest.importorskip("skimage.metrics")
    ref = np.clip(ct.array[0], -1000, 1000).astype(np.float64)
    noisy = ref + np.random.default_rng(0).normal(0, 60, ref.shape)
    _, expected = metrics.structural_similarity(
        np.clip(noisy, -1000, 1000), ref, data_range=2000.0, gaussian_weights=True, full=True
    )
    np.testing.assert_allclose(ssim_map(noisy, ref), expected, atol=1e-6)


def test_metrics_in_the_body_mask(ct):
    mask = estimate_body_mask(ct.array)
    assert 0.2 < mask.mean() < 0.95
    assert psnr_db(ct.array, ct.array, mask) == math.inf
    assert ssim_in_mask(ct.array, ct.array, mask) == pytest.approx(1.0)
    worse = ct.array + 100.0
    assert psnr_db(worse, ct.array, mask) == pytest.approx(20 * math.log10(2000 / 100), abs=0.5)
