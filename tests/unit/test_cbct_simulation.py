"""CBCT simulation from real CT (models/physics/cbct*.py) and ``voxelgate simulate cbct``.

The CT is the real TotalSegmentator example (``example_ct_sm``, 3 mm, flipped axes in LPS),
block-averaged to 6 mm (15 x 50 x 61) so that each simulation takes well under a second of CPU;
loading RTK's wrapper library takes most of this file's time (about 20 CPU-seconds, once).
Errors are in HU inside the body (CT > -500 HU) and the field of view.
"""

import dataclasses
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from models.errors import InputRejected
from models.volume import Volume, lps_to_ras, to_ijk_order

pytest.importorskip("itk")

from models.physics import cbct_geometry as cg
from models.physics import cbct_rtk
from models.physics.cbct import (
    MU_WATER_PER_MM,
    CBCTArtefacts,
    CBCTGeometry,
    random_artefacts,
    simulate_cbct,
)
from service.cli import main
from service.io.nifti import read_nifti
from tests.unit.cbct_to_sct_data import block_mean

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
EXAMPLE_CT = DATA / "totalsegmentator" / "example_ct_sm.nii.gz"
GEOMETRY = CBCTGeometry(n_projections=48)
CLEAN_MAE_HU = 60.0
"""Tolerance of the clean round trip (measured: about 45 HU at 60 projections, Hann filter)."""


@pytest.fixture(scope="module")
def ct() -> Volume:
    if not EXAMPLE_CT.exists():
        pytest.skip(f"{EXAMPLE_CT} not available")
    coarse = block_mean(read_nifti(EXAMPLE_CT), 2)
    return dataclasses.replace(coarse, modality="CT", units="HU", frame_of_reference_uid="1.2.3.4")


@pytest.fixture(scope="module")
def body(ct) -> np.ndarray:
    return ct.array > -500


@pytest.fixture(scope="module")
def clean(ct):
    return simulate_cbct(ct, GEOMETRY, CBCTArtefacts(), seed=0, threads=1)


def depth_mm(body: np.ndarray, spacing: tuple[float, float, float]) -> np.ndarray:
    """Per axial slice, the distance (mm) of each body voxel from the body's outline."""
    return np.stack([ndimage.distance_transform_edt(s, sampling=spacing[1:]) for s in body])


def sphere_volume(n: int, spacing: float, radius: float, centre_offset: np.ndarray) -> Volume:
    """Water sphere (HU 0, partial volume 4^3) in air on a permuted, flipped grid (LPS)."""
    affine = np.zeros((4, 4))
    affine[:3, 0] = [0, 0, -spacing]  # k towards inferior
    affine[:3, 1] = [spacing, 0, 0]  # j towards left
    affine[:3, 2] = [0, -spacing, 0]  # i towards anterior
    affine[:3, 3] = [-40.0, 25.0, 60.0]
    affine[3, 3] = 1.0
    grid = Volume(np.zeros((n, n, n), np.float32), affine, "CT", "HU")
    centre = cg.isocentre_lps(grid) + centre_offset
    sub = (np.arange(4) + 0.5) / 4 - 0.5
    idx = np.stack(np.meshgrid(*[np.arange(n)] * 3, indexing="ij"), -1).astype(np.float64)
    inside = np.zeros((n, n, n))
    for a in sub:
        for b in sub:
            for c in sub:
                pos = grid.index_to_lps(idx + np.array([a, b, c]))
                inside += np.linalg.norm(pos - centre, axis=-1) < radius
    hu = (inside / 4**3 * 1000.0 - 1000.0).astype(np.float32)
    return grid.with_array(hu)


def projection_centroid(p: np.ndarray, detector: cg.Detector) -> tuple[float, float]:
    """Line-integral-weighted centre ``(u, v)`` (mm) of one projection ``[v, u]``."""
    v = detector.v0_mm + detector.pitch_mm * np.arange(detector.n_v)
    total = float(p.sum())
    return float((p.sum(axis=0) * detector.u_mm).sum() / total), float(
        (p.sum(axis=1) * v).sum() / total
    )


# --- geometry, independently of the CT ---


def test_forward_projection_of_a_water_sphere_has_its_diameter_and_magnified_position():
    offset = np.array([20.0, 0.0, 15.0])  # LPS: 20 mm left, 15 mm superior of the isocentre
    sphere = sphere_volume(32, 5.0, 40.0, offset)
    iso = cg.isocentre_lps(sphere)
    geometry = CBCTGeometry(n_projections=4, detector_shape=(161, 121), detector_pitch_mm=1.5)
    detector = cg.resolve_detector(sphere, iso, geometry)
    mu = np.clip(MU_WATER_PER_MM * (1 + sphere.array / 1000.0), 0, None).astype(np.float32)
    p = cbct_rtk.forward_project(mu, sphere, iso, geometry, detector)
    assert p.shape == (4, 121, 161)
    assert p[:, :, [0, -1]].max() == 0.0  # the sphere's shadow fits on the detector
    assert p[:, [0, -1], :].max() == 0.0
    # the central ray through a sphere crosses its diameter: mu_water x 80 mm
    assert p.max() == pytest.approx(MU_WATER_PER_MM * 80.0, rel=0.01)
    # first projection (source anterior): u = patient left, v = superior, magnification 1.5
    u, v = projection_centroid(p[0], detector)
    assert u == pytest.approx(1.5 * 20.0, abs=1.0)
    assert v == pytest.approx(1.5 * 15.0, abs=1.0)
    # a quarter turn later the sphere's offset is along the ray: centred in u
    u, _ = projection_centroid(p[1], detector)
    assert abs(u) <= 1.0


def test_fdk_puts_an_off_centre_sphere_back_where_it_was():
    offset = np.array([25.0, -20.0, 10.0])
    sphere = sphere_volume(32, 5.0, 35.0, offset)
    result = simulate_cbct(sphere, CBCTGeometry(n_projections=36), seed=0, threads=1)
    hu = result.volume.array
    found = hu > -500
    idx = np.argwhere(found)
    weights = (hu[found] + 1000.0)[:, None]
    centroid = sphere.index_to_lps((idx * weights).sum(0) / weights.sum())
    expected = cg.isocentre_lps(sphere) + offset
    assert np.allclose(centroid, expected, atol=2.5)  # half a voxel
    inner = sphere.array > -1.0
    assert abs(float(np.median(hu[inner]))) < 40.0  # water reads 0 HU


# --- (a) clean round trip on the real CT ---


def test_clean_simulation_reproduces_the_ct_on_its_grid(ct, body, clean):
    cbct, facts, fov = clean
    assert cbct.shape == ct.shape
    assert np.array_equal(cbct.affine, ct.affine)
    assert (cbct.modality, cbct.units) == ("CT", "HU")
    assert cbct.frame_of_reference_uid == ct.frame_of_reference_uid
    assert cbct.array.dtype == np.float32
    assert fov.array.dtype == np.bool_
    assert np.array_equal(fov.affine, ct.affine)
    assert facts["fov_fraction"] == pytest.approx(1.0)  # the auto detector covers the grid
    inside = body & fov.array
    error = np.abs(cbct.array - ct.array)[inside]
    mae = float(error.mean())
    assert mae < CLEAN_MAE_HU, mae
    # the same comparison against a flipped CT is far worse: geometry errors would show
    for axis in range(3):
        flipped = np.abs(np.flip(cbct.array, axis) - ct.array)[inside].mean()
        assert flipped > 1.5 * mae, (axis, flipped, mae)
    json.dumps(facts)  # JSON-compatible
    assert facts["simulated"] is True
    assert facts["seed"] == 0
    assert facts["geometry"]["n_projections"] == 48
    assert facts["detector"]["n_u"] >= 2
    assert facts["timings_s"]["total"] > 0


# --- (b) scatter and beam hardening cup the image ---


def _centre_minus_periphery(cbct: np.ndarray, clean: np.ndarray, body, ct) -> float:
    depth = depth_mm(body, ct.spacing)
    centre = body & (depth > 0.6 * depth.max())
    periphery = body & (depth > 0) & (depth <= 12.0)
    diff = cbct - clean
    return float(diff[centre].mean() - diff[periphery].mean())


def test_scatter_darkens_the_centre_more_with_higher_spr(ct, body, clean):
    low = simulate_cbct(ct, GEOMETRY, CBCTArtefacts(spr=0.3), threads=1)
    high = simulate_cbct(ct, GEOMETRY, CBCTArtefacts(spr=1.0), threads=1)
    inside = body & clean.fov_mask.array
    cup_low = _centre_minus_periphery(low.volume.array, clean.volume.array, body, ct)
    cup_high = _centre_minus_periphery(high.volume.array, clean.volume.array, body, ct)
    assert cup_low < -20.0, cup_low
    assert cup_high < cup_low - 20.0, (cup_low, cup_high)
    drop_low = float((low.volume.array - clean.volume.array)[inside].mean())
    drop_high = float((high.volume.array - clean.volume.array)[inside].mean())
    assert drop_high < drop_low < 0.0
    assert 0 < low.facts["spr_over_whole_shadow"] < 0.3


def test_beam_hardening_cups_the_centre(ct, body, clean):
    hardened = simulate_cbct(ct, GEOMETRY, CBCTArtefacts(cupping=0.02), threads=1)
    cup = _centre_minus_periphery(hardened.volume.array, clean.volume.array, body, ct)
    assert cup < -10.0, cup


# --- (c) seeds ---


def test_same_seed_same_output_different_seed_differs(ct):
    noisy = CBCTArtefacts(spr=0.2, i0=2e4)
    first = simulate_cbct(ct, GEOMETRY, noisy, seed=7, threads=1)
    again = simulate_cbct(ct, GEOMETRY, noisy, seed=7, threads=1)
    other = simulate_cbct(ct, GEOMETRY, noisy, seed=8, threads=1)
    assert np.array_equal(first.volume.array, again.volume.array)
    assert not np.array_equal(first.volume.array, other.volume.array)
    assert first.facts["noise"] == "poisson"


def test_random_artefacts_follow_the_seed_and_stay_in_their_ranges():
    assert random_artefacts(3) == random_artefacts(3)
    draws = [random_artefacts(seed) for seed in range(40)]
    assert len({d.spr for d in draws}) == 40
    for d in draws:
        assert 0.1 <= d.spr <= 1.0
        assert 30 <= d.scatter_sigma_mm <= 100
        assert d.i0 is not None
        assert 1e4 <= d.i0 <= 1e5
        assert 0 <= d.cupping <= 0.02
        assert d.truncation_fov_mm is None or 250 <= d.truncation_fov_mm <= 400
        assert all(abs(s) <= 3 for s in d.shift_mm)
        assert all(abs(r) <= 2 for r in d.rotation_deg)
    assert any(d.truncation_fov_mm is None for d in draws)
    assert any(d.truncation_fov_mm is not None for d in draws)


# --- (d) truncation and field of view ---


def test_truncation_shrinks_the_fov_and_flags_outside_voxels(ct, body, clean):
    cut = simulate_cbct(ct, GEOMETRY, CBCTArtefacts(truncation_fov_mm=200.0), threads=1)
    mask = cut.fov_mask.array
    assert mask.mean() < clean.fov_mask.array.mean()
    assert cut.facts["fov_fraction"] == pytest.approx(float(mask.mean()))
    assert cut.facts["detector"]["fov_radius_mm"] <= 100.0 + 1e-6
    assert np.all(cut.volume.array[~mask] == -1000.0)
    assert cut.facts["body_fraction_outside_fov"] > 0.1  # the 366 mm wide body is cut
    assert cut.facts["detector"]["n_u"] < cut.facts["detector"]["n_u_before_truncation"]
    # truncated rows are extended before filtering (automatic): the FOV keeps usable HU
    assert cut.facts["truncation_correction_used"] == pytest.approx(0.25)
    assert clean.facts["truncation_correction_used"] == 0.0
    inside = body & mask
    mae = float(np.abs(cut.volume.array - ct.array)[inside].mean())
    assert mae < 1.5 * CLEAN_MAE_HU, mae  # measured 58 HU
    # without it, zero padding of truncated rows leaves the known FDK offset (measured 533 HU)
    raw_geometry = CBCTGeometry(n_projections=48, truncation_correction=0.0)
    raw = simulate_cbct(ct, raw_geometry, CBCTArtefacts(truncation_fov_mm=200.0), threads=1)
    raw_mae = float(np.abs(raw.volume.array - ct.array)[inside].mean())
    assert raw_mae > 3 * mae, (raw_mae, mae)


def test_fov_mask_agrees_with_rtk_field_of_view_filter(ct):
    import itk
    from itk import RTK as rtk  # noqa: N811

    iso = cg.isocentre_lps(ct)
    full = cg.resolve_detector(ct, iso, GEOMETRY)
    detector = full.columns(cg.truncation_columns(full, GEOMETRY, 200.0))
    ours = cg.fov_mask(ct, iso, detector, GEOMETRY)
    image_type = itk.Image[itk.F, 3]
    fov = rtk.FieldOfViewImageFilter[image_type, image_type].New()
    fov.SetInput(cbct_rtk.volume_image(np.ones(ct.shape, np.float32), ct, iso))
    empty = np.zeros((GEOMETRY.n_projections, detector.n_v, detector.n_u), np.float32)
    fov.SetProjectionsStack(cbct_rtk.projection_image(empty, detector))
    fov.SetGeometry(cbct_rtk.circular_geometry(GEOMETRY))
    fov.SetMask(True)
    fov.Update()
    theirs = itk.array_from_image(fov.GetOutput()) > 0.5
    assert 0.2 < ours.mean() < 0.9
    assert (ours != theirs).mean() < 0.01


def test_half_fan_offset_detector_reconstructs_a_wider_fov(ct, body):
    iso = cg.isocentre_lps(ct)
    full = cg.resolve_detector(ct, iso, GEOMETRY)
    n_u = full.n_u // 2 + 8
    narrow = CBCTGeometry(n_projections=48, detector_shape=(n_u, full.n_v))
    offset = CBCTGeometry(
        n_projections=48,
        detector_shape=(n_u, full.n_v),
        detector_offset_mm=(n_u // 2 - 6) * full.pitch_mm,
    )
    centred = simulate_cbct(ct, narrow, threads=1)
    half_fan = simulate_cbct(ct, offset, threads=1)
    assert half_fan.facts["detector"]["displaced"] is True
    radius = half_fan.facts["detector"]["fov_radius_mm"]
    assert radius > 1.5 * centred.facts["detector"]["fov_radius_mm"]
    assert half_fan.fov_mask.array.mean() > centred.fov_mask.array.mean()
    inside = body & half_fan.fov_mask.array
    mae = float(np.abs(half_fan.volume.array - ct.array)[inside].mean())
    assert mae < 1.5 * CLEAN_MAE_HU, mae


def test_misregistration_moves_the_anatomy_and_is_recorded(ct, body, clean):
    moved = simulate_cbct(ct, GEOMETRY, CBCTArtefacts(shift_mm=(12.0, 0.0, 0.0)), threads=1)
    assert moved.facts["misregistration"]["applied"] is True
    assert moved.facts["misregistration"]["shift_mm_lps"] == [12.0, 0.0, 0.0]

    def centroid_x(hu: np.ndarray) -> float:
        idx = np.argwhere(hu > -500)
        return float(ct.index_to_lps(idx.mean(axis=0))[0])

    shift = centroid_x(moved.volume.array) - centroid_x(clean.volume.array)
    assert shift == pytest.approx(12.0, abs=3.0)


# --- (e) bad input ---


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: CBCTArtefacts(spr=-0.1), "spr"),
        (lambda: CBCTArtefacts(i0=0.5), "i0"),
        (lambda: CBCTArtefacts(cupping=-1.0), "cupping"),
        (lambda: CBCTArtefacts(shift_mm=(1.0, 2.0)), "shift_mm"),
        (lambda: CBCTGeometry(sad_mm=1000.0, sdd_mm=900.0), "sdd_mm"),
        (lambda: CBCTGeometry(sad_mm=1000.0, sdd_mm=1000.0), "larger than sad_mm"),
        (lambda: CBCTGeometry(n_projections=0), "n_projections"),
        (lambda: CBCTGeometry(detector_pitch_mm=float("nan")), "detector_pitch_mm"),
        (lambda: CBCTGeometry(fdk_filter="shepp"), "fdk_filter"),
        (lambda: CBCTGeometry(truncation_correction=2.0), "truncation_correction"),
        (lambda: random_artefacts(-1), "seed"),
    ],
)
def test_bad_parameters_are_refused_clearly(make, message):
    with pytest.raises(InputRejected, match=message):
        make()


def test_non_ct_volume_is_refused(ct):
    mr = ct.with_array(ct.array, modality="MR", units="")
    with pytest.raises(InputRejected, match="needs a CT volume in HU"):
        simulate_cbct(mr, GEOMETRY)


def test_offset_detector_missing_the_central_ray_is_refused(ct):
    geometry = CBCTGeometry(n_projections=8, detector_shape=(20, 20), detector_offset_mm=200.0)
    with pytest.raises(InputRejected, match="central ray"):
        simulate_cbct(ct, geometry)


# --- (f) the command line ---


def test_cli_writes_cbct_facts_and_mask(ct, tmp_path, capsys):
    affine = ct.affine.copy()
    affine[:3, 3] = ct.index_to_lps([4, 0, 0])
    small = Volume(np.ascontiguousarray(ct.array[4:10]), affine, "CT", "HU")
    source = tmp_path / "ct.nii.gz"
    data_ijk, affine_ijk = to_ijk_order(small.array, small.affine)
    nib.save(nib.Nifti1Image(data_ijk, lps_to_ras(affine_ijk)), source)  # no modality recorded
    out = tmp_path / "out" / "cbct.nii.gz"
    base = ["simulate", "cbct", str(source), str(out), "--projections", "24", "--threads", "1"]
    assert main(base) == 2  # modality unknown: refused with a hint
    assert "--modality CT" in capsys.readouterr().err
    assert not out.exists()
    args = [*base, "--modality", "CT", "--spr", "0.3", "--i0", "5e4", "--truncate", "--seed", "4"]
    assert main(args) == 0
    printed = json.loads(capsys.readouterr().out)
    assert Path(printed["cbct"]) == out
    facts = json.loads((tmp_path / "out" / "cbct.json").read_text())
    assert facts["seed"] == 4
    assert facts["artefacts"]["spr"] == 0.3
    assert facts["artefacts"]["truncation_fov_mm"] == 250.0
    assert facts["input"]["kind"] == "nifti"
    assert facts["simulated"] is True
    cbct = read_nifti(out)
    assert (cbct.modality, cbct.units) == ("CT", "HU")
    assert cbct.shape == small.shape
    assert np.allclose(cbct.affine, small.affine, atol=1e-4)
    mask = read_nifti(tmp_path / "out" / "cbct_fov.nii.gz")
    assert set(np.unique(mask.array)) <= {0, 1}
    assert mask.array.any()
    assert np.all(cbct.array[mask.array == 0] == -1000)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "cbct.json",
        "cbct.nii.gz",
        "cbct_fov.nii.gz",
    ]
