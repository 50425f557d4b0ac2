"""sparse-view-ct on projection data (input (a)) and on FBP series (input (c)).

Real measured data: the sarepy 360 degree neutron sinogram (../shared/data/sarepy). Simulated
data: a real CT slice (TotalSegmentator example CT) forward-projected with our fan-beam
projector, written as a bundle (line integrals or counts + geometry JSON).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from models.errors import InputRejected, InvalidParameters
from models.physics.conjugate import parallel_conjugate_map
from models.physics.fan_geometry import FanBeamGeometry
from models.physics.lowdose import estimate_body_mask, hu_to_mu
from models.physics.projector import make_projector
from models.pipelines.sparse_view_ct.metrics import psnr_db
from models.pipelines.sparse_view_ct.params import LEARNED_WEIGHTS, SparseViewCTParams
from models.pipelines.sparse_view_ct.pipeline import run
from models.registry import get_spec, validate_params
from models.sinogram import SinogramSpec, normalise_projections
from service.io.sinogram import read_sinogram
from tests.unit.physics_data import load_ct_slice
from workers.runner import LocalJob, run_local

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
SAREPY = DATA / "sarepy" / "sinogram_360_neutron_image.tif"


def _quiet(fraction: float, step: str) -> None:
    """Progress callback that ignores everything."""


def _bundle(folder: Path, data_name: str, **spec: object) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    content = {"format": "voxelgate-sinogram/1", "data": data_name, **spec}
    path = folder / "geometry.json"
    path.write_text(json.dumps(content))
    return path


@pytest.fixture(scope="module")
def sarepy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real sarepy sinogram as a bundle: counts, flat field from the edges, 256 px of 2."""
    if not SAREPY.exists():
        pytest.skip(f"{SAREPY} not available")
    folder = tmp_path_factory.mktemp("sarepy")
    shutil.copy(SAREPY, folder / "sinogram.tif")
    _bundle(
        folder,
        "sinogram.tif",
        quantity="counts",
        flat_field="edges",
        zero_counts="clip",
        beam="parallel",
        angles={"stop_deg": 360, "endpoint": True},
        centre_of_rotation="auto",
        image_size=256,
        pixel_size_mm=2.0,
        modality="OT",
        description="sarepy 360 degree neutron sinogram (real, Apache-2.0)",
    )
    return folder


def test_real_sarepy_sinogram_is_normalised(sarepy: Path) -> None:
    sino = read_sinogram(sarepy)
    # 459 rows over [0, 360] with the last repeating the first: 458 views over [0, 360)
    assert sino.data.shape == (1, 458, 503)
    assert sino.meta["dropped_last_view"] is True
    assert sino.meta["clipped_readings"] > 0  # the file has zero readings; clipped on request
    assert 40000 < sino.meta["flat_field_median"] < 50000
    # the estimated rotation axis makes each view agree with its flipped conjugate view
    raw = _raw_line_integrals()
    conjugate = parallel_conjugate_map(458, 503)
    before = np.median(np.abs(raw - conjugate.apply(raw)))
    after = np.median(np.abs(sino.data[0] - conjugate.apply(sino.data[0])))
    assert after < 0.5 * before, (before, after)
    assert abs(sino.meta["centre_shift_bins"]) > 2  # this scan's axis is visibly off centre


def _raw_line_integrals() -> np.ndarray:
    """The sarepy rows 0..457 as line integrals, no centring (edge flat field, clip at 1)."""
    import tifffile

    counts = tifffile.imread(SAREPY).astype(np.float64)[:458]
    flat = np.median(np.concatenate([counts[:, :16], counts[:, -16:]], axis=1), axis=1)
    return -np.log(np.maximum(counts, 1.0) / flat[:, None])


def test_real_sarepy_sparse_views_cgls_beats_fbp(sarepy: Path, tmp_path: Path) -> None:
    """Every 2nd view of the real scan: CGLS is closer to the all-view FBP than sparse FBP."""
    fbp = run_local(
        LocalJob("sparse-view-ct", sarepy, tmp_path / "fbp", {"method": "fbp", "view_stride": 2}),
        _quiet,
    )
    cgls = run_local(
        LocalJob(
            "sparse-view-ct",
            sarepy / "geometry.json",
            tmp_path / "cgls",
            {"method": "cgls", "view_stride": 2, "iterations": 12},
        ),
        _quiet,
    )
    f, c = fbp["measurements"], cgls["measurements"]
    assert (f["views"], f["views_in_data"]) == (229, 458)
    assert (f["units"], f["normalisation"]["quantity"]) == ("1/mm", "counts")
    # measured here (256 px of 2 mm): FBP 23.1 dB, CGLS 12 it 24.2 dB against the all-view FBP
    assert c["result_psnr_db"] > f["result_psnr_db"] + 0.5
    assert c["residual_mean"] < f["residual_mean"]  # CGLS fits the data better than FBP
    for out in (tmp_path / "fbp", tmp_path / "cgls"):
        assert (out / "reconstruction.nii.gz").exists()
        assert (out / "comparison.png").exists()


@pytest.fixture(scope="module")
def fan_case() -> tuple[np.ndarray, FanBeamGeometry, np.ndarray]:
    """A real CT slice (122 px of 3 mm) and its 360-view fan-beam line integrals."""
    slice_hu = load_ct_slice()
    n = slice_hu.shape[0]
    geometry = FanBeamGeometry(n, 3.0, 360, 595.0, 1085.6, "equiangular", None, 3.0 * 1.8246 / 2)
    projector = make_projector(geometry, "torch", "cpu")
    return slice_hu, geometry, np.asarray(projector.forward(hu_to_mu(slice_hu)))


def _fan_spec(geometry: FanBeamGeometry, **extra: object) -> dict[str, object]:
    return {
        "beam": "fan",
        "detector": "equiangular",
        "source_to_isocentre_mm": geometry.source_to_isocentre_mm,
        "source_to_detector_mm": geometry.source_to_detector_mm,
        "detector_spacing_mm": geometry.det_spacing_mm,
        "image_size": geometry.image_size,
        "pixel_size_mm": geometry.pixel_size_mm,
        **extra,
    }


def test_fan_beam_bundle_reconstructs_the_slice(fan_case, tmp_path: Path) -> None:
    slice_hu, geometry, line = fan_case
    np.save(tmp_path / "sino.npy", line.astype(np.float32))
    _bundle(tmp_path, "sino.npy", quantity="line_integrals", **_fan_spec(geometry))
    out = run_local(
        LocalJob("sparse-view-ct", tmp_path, tmp_path / "out", {"method": "fbp"}), _quiet
    )
    m = out["measurements"]
    assert (m["geometry"]["beam"], m["units"]) == ("fan", "HU")
    import nibabel as nib

    recon = np.asarray(nib.load(tmp_path / "out" / "reconstruction.nii.gz").dataobj)
    assert recon.shape[:2] == (geometry.image_size, geometry.image_size)
    image = read_sinogram(tmp_path)  # the same data through the reader alone
    result = run({"sinogram": image}, SparseViewCTParams(method="fbp"), _quiet)
    hu = result.volumes["reconstruction"].array[0]
    mask = estimate_body_mask(slice_hu)
    assert psnr_db(hu, slice_hu, mask) > 30.0  # noiseless 360-view fan FBP of the real slice


def test_counts_clockwise_and_line_integrals_agree(fan_case, tmp_path: Path) -> None:
    """Counts with a flat field and a clockwise view order give the same sinogram."""
    _, geometry, line = fan_case
    counts = 1e5 * np.exp(-line)
    clockwise = counts[(-np.arange(line.shape[0])) % line.shape[0]]
    spec = SinogramSpec.model_validate(
        {
            "format": "voxelgate-sinogram/1",
            "data": "x.npy",
            "quantity": "counts",
            "flat_field": 1e5,
            "angles": {"stop_deg": 360, "direction": "clockwise"},
            **_fan_spec(geometry),
        }
    )
    sino = normalise_projections(clockwise, spec)
    np.testing.assert_allclose(sino.data[0], line, atol=1e-4)


def _line_spec(**extra: object) -> SinogramSpec:
    return SinogramSpec.model_validate(
        {
            "format": "voxelgate-sinogram/1",
            "data": "x.npy",
            "quantity": "line_integrals",
            "beam": "parallel",
            **extra,
        }
    )


def test_bad_projection_data_is_refused_before_work(tmp_path: Path) -> None:
    good = np.ones((60, 40), dtype=np.float32)
    with pytest.raises(InputRejected, match="views=50 but the data has 60"):
        normalise_projections(good, _line_spec(views=50))
    with pytest.raises(InputRejected, match="detectors=41 but the data has 40"):
        normalise_projections(good, _line_spec(detectors=41))
    bad = good.copy()
    bad[3, 4] = np.nan
    with pytest.raises(InputRejected, match="1 NaN or infinite"):
        normalise_projections(bad, _line_spec())
    zeros = np.full((60, 40), 100.0)
    zeros[:2, :3] = 0
    spec = _line_spec().model_copy(update={"quantity": "counts", "flat_field": 1000.0})
    with pytest.raises(InputRejected, match=r"6 readings are <= 0.*zero_counts"):
        normalise_projections(zeros, spec)
    negative = np.full((60, 40), 0.5)
    negative[0, 0] = -0.1
    spec = _line_spec().model_copy(update={"quantity": "transmission"})
    with pytest.raises(InputRejected, match="1 readings are <= 0"):
        normalise_projections(negative, spec)
    with pytest.raises(InputRejected, match="axes"):
        normalise_projections(np.ones((2, 60, 40)), _line_spec())
    with pytest.raises(ValueError, match="source_to_isocentre_mm"):
        _line_spec(beam="fan")
    with pytest.raises(ValueError, match="file name next to the JSON"):
        _line_spec(data="../../etc/passwd.npy")
    with pytest.raises(ValueError, match="flat_field"):
        _line_spec(quantity="counts")
    # through the reader: a JSON that names a missing file, and one that breaks the schema
    _bundle(tmp_path / "missing", "nothere.npy", quantity="line_integrals", beam="parallel")
    with pytest.raises(InputRejected, match="missing"):
        read_sinogram(tmp_path / "missing")
    _bundle(tmp_path / "schema", "x.npy", quantity="photons", beam="parallel")
    with pytest.raises(InputRejected, match="quantity"):
        read_sinogram(tmp_path / "schema")
    (tmp_path / "shape").mkdir()
    np.save(tmp_path / "shape" / "x.npy", good)
    _bundle(
        tmp_path / "shape",
        "x.npy",
        quantity="line_integrals",
        beam="parallel",
        axes=["slices", "views", "detectors"],
    )
    with pytest.raises(InputRejected, match="2 axes"):
        read_sinogram(tmp_path / "shape")


def test_stride_and_method_checks_on_sinograms(fan_case, tmp_path: Path) -> None:
    _, geometry, line = fan_case
    np.save(tmp_path / "sino.npy", line.astype(np.float32))
    _bundle(tmp_path, "sino.npy", quantity="line_integrals", **_fan_spec(geometry))
    image = read_sinogram(tmp_path)
    with pytest.raises(InputRejected, match="view_stride=7 must divide the 360 views"):
        run({"sinogram": image}, SparseViewCTParams(method="fbp", view_stride=7), _quiet)
    with pytest.raises(InputRejected, match="not arbitrary projection data"):
        run({"sinogram": image}, SparseViewCTParams.model_construct(method="learned"), _quiet)


@pytest.mark.skipif(LEARNED_WEIGHTS is not None, reason="weights are shipped")
def test_fbp_series_input_needs_the_learned_weights() -> None:
    with pytest.raises(InvalidParameters, match="learned"):
        validate_params(
            get_spec("sparse-view-ct"), {"input_kind": "sparse-view-fbp", "method": "learned"}
        )


def test_fbp_series_refuses_other_methods() -> None:
    from models.volume import Volume

    volume = Volume(np.zeros((1, 32, 32), np.float32), np.eye(4), "CT", "HU")
    with pytest.raises(InputRejected, match="method 'learned' only"):
        run(
            {"image": volume}, SparseViewCTParams(input_kind="sparse-view-fbp", method="tv"), _quiet
        )


def test_the_bundled_example_bundle_reads() -> None:
    """examples/sinogram (the sarepy scan with its JSON) is the README's sinogram example."""
    example = Path(__file__).resolve().parents[2] / "examples" / "sinogram"
    sino = read_sinogram(example / "sarepy.json")
    assert sino.data.shape == (1, 458, 503)
    assert sino.geometry.image_size == 503
    assert sino.meta["description"].startswith("sarepy")
