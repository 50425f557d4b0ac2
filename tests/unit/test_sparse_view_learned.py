"""The shipped learned sparse-view network on a held-out real slice, inputs (b) and (c).

The slice comes from an OpenKBP *validation* patient (never trained on); the scan is simulated
by the pipeline itself (clinical fan beam, Poisson noise, fixed seed).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from models.errors import InputRejected
from models.pipelines.sparse_view_ct.params import LEARNED_WEIGHTS, SparseViewCTParams
from models.pipelines.sparse_view_ct.pipeline import run
from models.registry import get_spec
from models.volume import Volume

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
CASE = DATA / "openkbp" / "validation-pats" / "pt_201" / "ct.nii.gz"

pytestmark = [
    pytest.mark.skipif(LEARNED_WEIGHTS is None, reason="no learned weights are shipped"),
    pytest.mark.skipif(not CASE.exists(), reason=f"{CASE} not available"),
]


def _quiet(fraction: float, step: str) -> None:
    """Progress callback that ignores everything."""


@pytest.fixture(scope="module")
def held_out() -> Volume:
    """Two axial slices of the held-out patient pt_201 (128 x 128, 5.4 mm), CT in HU."""
    from service.io.nifti import read_nifti

    vol = read_nifti(CASE)
    k = vol.shape[0] // 2
    part = vol.array[k : k + 2].astype(np.float32)
    affine = vol.affine.copy()
    affine[:3, 3] = vol.index_to_lps([float(k), 0.0, 0.0])
    return Volume(part, affine, "CT", "HU", "1.2.3.4", {"series_instance_uid": "1.2.3"})


def test_registry_stamps_the_weights() -> None:
    spec = get_spec("sparse-view-ct")
    assert spec.weights == LEARNED_WEIGHTS
    assert len(spec.weights_sha256()) == 64


@pytest.mark.parametrize("views", [18, 60])
def test_learned_beats_fbp_and_fbp_series_input_agrees(held_out: Volume, views: int) -> None:
    learned = run({"image": held_out}, SparseViewCTParams(method="learned", views=views), _quiet)
    m = learned.measurements
    assert m["method"] == "learned"
    assert m["geometry"]["source_to_isocentre_mm"] >= 595.0  # the training's clinical scanner
    # the network must improve on its own input on a patient it never saw
    assert m["network_psnr_db"] > m["fbp_psnr_db"] + 1.0, m  # measured: +1.8 (18), see card
    assert m["network_ssim"] > m["fbp_ssim"]
    # and its data-consistency step (on by default) must improve on the network and fit the
    # data better than FBP does
    assert m["data_consistency"]["method"] == "tv"
    assert m["iterations"] == m["data_consistency"]["iterations"] == 200
    assert m["result_psnr_db"] > m["network_psnr_db"] + 1.0, m
    assert m["result_ssim"] > m["network_ssim"]
    assert m["residual_mean"] < m["fbp_residual_mean"]
    # without the step the result is the network output
    alone = run(
        {"image": held_out},
        SparseViewCTParams(method="learned", views=views, data_consistency="none"),
        _quiet,
    )
    assert alone.measurements["result_psnr_db"] == pytest.approx(m["network_psnr_db"])
    assert alone.measurements["iterations"] == 0
    # (c): the FBP of the same scan, given as an FBP series, gives the same network output
    fbp = run(
        {"image": held_out},
        SparseViewCTParams(method="fbp", views=views, scanner="clinical"),
        _quiet,
    )
    series = fbp.volumes["reconstruction"]
    post = run(
        {"image": series},
        SparseViewCTParams(method="learned", views=views, input_kind="sparse-view-fbp"),
        _quiet,
    )
    out = post.volumes["reconstruction"].array
    body = held_out.array > -500
    difference = np.abs(out - alone.volumes["reconstruction"].array)[body]
    assert float(np.median(difference)) < 5.0  # HU; only the crop/pad border may differ
    assert post.measurements["views"] == views
    assert post.measurements["data_consistency"]["method"] == "none"


def test_fbp_series_refuses_an_explicit_data_consistency_step(held_out: Volume) -> None:
    params = SparseViewCTParams(
        method="learned", views=60, input_kind="sparse-view-fbp", data_consistency="tv"
    )
    with pytest.raises(InputRejected, match="projection data"):
        run({"image": held_out}, params, _quiet)
