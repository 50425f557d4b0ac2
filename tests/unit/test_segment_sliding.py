"""Streamed sliding-window inference and the CT body crop of ``segment``.

* The streamed class map equals the argmax of MONAI's full-buffer ``sliding_window_inference``
  (Gaussian and constant blending, overlap 0.25/0.5, volumes larger and smaller than the
  window): bitwise along axis 0 (MONAI's own window order), up to float near-ties along the
  others.
* The slab it holds is one window long along the streamed axis.
* The body crop (CT) gives the uncropped labels inside the body and background outside; a
  pointwise "network" (a 1x1x1 convolution thresholding the intensity) makes the labels
  independent of the window placement, so any difference would be the crop's.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.inferers import sliding_window_inference
from monai.networks.nets import UNet

from models.pipelines.segment import inference
from models.pipelines.segment.card import Intensity, ModelCard
from models.pipelines.segment.geometry import nearest_back, reorientation
from models.pipelines.segment.inference import (
    body_box,
    network_box,
    normalise,
    predict_classes,
    resample_image,
)
from models.pipelines.segment.networks import FinalOutput
from models.pipelines.segment.params import SegmentParams
from models.pipelines.segment.pipeline import segment_volume
from models.pipelines.segment.sliding import sliding_window_classes
from models.result import no_progress
from models.volume import Volume

PATCH = (16, 16, 16)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def unet() -> torch.nn.Module:
    torch.manual_seed(0)
    net = UNet(3, 1, 4, channels=(4, 8, 16), strides=(2, 2), num_res_units=1)
    return net.eval()


def _monai(x: torch.Tensor, net: torch.nn.Module, overlap: float, mode: str) -> torch.Tensor:
    with torch.inference_mode():
        out = sliding_window_inference(
            x,
            PATCH,
            3,
            net,
            overlap=overlap,
            mode=mode,
            padding_mode="constant",
            cval=float(x.min()),
        )
    assert isinstance(out, torch.Tensor)
    return out[0]


@pytest.mark.parametrize("shape", [(40, 50, 36), (33, 16, 70), (10, 30, 12), (7, 9, 40)])
@pytest.mark.parametrize("overlap", [0.25, 0.5])
def test_streamed_classes_equal_monai_full_buffer(unet, shape, overlap):
    x = torch.randn(1, 1, *shape, generator=torch.Generator().manual_seed(sum(shape)))
    for mode in ("gaussian", "constant"):
        logits = _monai(x, unet, overlap, mode)
        ref = logits.argmax(0).numpy()
        top2 = logits.topk(2, dim=0).values
        near_tie = ((top2[0] - top2[1]) <= 1e-5 * top2[0].abs().clamp(min=1.0)).numpy()
        for axis in (0, 1, 2, None):
            with torch.inference_mode():
                classes, stats = sliding_window_classes(
                    x, unet, PATCH, overlap=overlap, sw_batch=3, mode=mode, axis=axis
                )
            assert classes.shape == shape
            assert classes.dtype == np.uint8
            if axis == 0:  # MONAI's window order: the same sums, bitwise
                np.testing.assert_array_equal(classes, ref)
            else:
                assert not ((classes != ref) & ~near_tie).any(), (mode, axis)
            assert stats.axis == (axis if axis is not None else int(np.argmax(stats.padded_shape)))


def test_streamed_slab_is_one_window_long(unet):
    shape = (20, 24, 120)
    x = torch.randn(1, 1, *shape, generator=torch.Generator().manual_seed(1))
    calls = []

    def predictor(batch: torch.Tensor) -> torch.Tensor:
        calls.append(batch.shape[0])
        return unet(batch)

    with torch.inference_mode():
        classes, stats = sliding_window_classes(x, predictor, PATCH, overlap=0.5, sw_batch=4)
    assert stats.axis == 2  # the longest axis
    step = stats.scan_interval[2]
    assert stats.slab_rows == PATCH[2]
    assert stats.max_live_rows <= PATCH[2] + step
    n_classes = 4
    assert stats.slab_bytes == (n_classes + 1) * PATCH[2] * shape[0] * shape[1] * 4
    full_buffer = (n_classes + 1) * int(np.prod(shape)) * 4  # MONAI: logits + count map
    assert stats.slab_bytes * 7 <= full_buffer
    assert sum(calls) == stats.windows
    assert max(calls) == 4
    np.testing.assert_array_equal(classes, _monai(x, unet, 0.5, "gaussian").argmax(0).numpy())


def test_predict_classes_equals_monai_gaussian_argmax(unet):
    """The call the pipeline makes (``segment_volume``): streamed, Gaussian, cval = minimum."""
    x = torch.randn(1, 1, 24, 20, 30, generator=torch.Generator().manual_seed(2))
    labels = predict_classes(x, unet, PATCH, overlap=0.5, sw_batch=2, bf16=False)
    assert labels.dtype == np.uint8  # 4 classes
    with torch.inference_mode():
        ref = sliding_window_inference(
            x, PATCH, 2, unet, overlap=0.5, mode="gaussian", cval=float(x.min())
        )
    assert isinstance(ref, torch.Tensor)
    np.testing.assert_array_equal(labels, ref[0].argmax(0).numpy())
    bf16 = predict_classes(x, unet, PATCH, overlap=0.5, sw_batch=2, bf16=True)
    assert bf16.shape == labels.shape
    assert (bf16 == labels).mean() > 0.8  # a random network: many near-ties


def test_predict_classes_uses_uint16_above_256_classes():
    torch.manual_seed(6)
    net = torch.nn.Conv3d(1, 300, 1).eval()  # pointwise: no dependence on the windows
    x = torch.randn(1, 1, 10, 12, 20, generator=torch.Generator().manual_seed(7))
    labels = predict_classes(x, net, PATCH, overlap=0.5, sw_batch=2, bf16=False)
    assert labels.dtype == np.uint16
    with torch.inference_mode():
        ref = sliding_window_inference(
            x, PATCH, 2, net, overlap=0.5, mode="gaussian", cval=float(x.min())
        )
    assert isinstance(ref, torch.Tensor)
    expected = ref[0].argmax(0).numpy()
    assert expected.max() > 255  # the test reaches the classes that need uint16
    np.testing.assert_array_equal(labels, expected)


def test_normalise_in_chunks_matches_the_whole_array_expression(monkeypatch):
    monkeypatch.setattr(inference, "NORMALISE_CHUNK_VOXELS", 50)
    rng = np.random.default_rng(3)
    hu = rng.normal(0, 400, (9, 11, 13)).astype(np.float32)
    view = np.flip(hu.transpose(2, 0, 1), axis=1)  # a canonical-style view
    card_window = Intensity.model_validate({"kind": "window", "lower": -200, "upper": 300})
    expected = ((np.clip(view, -200.0, 300.0) + 200.0) / 500.0).astype(np.float32)
    out = normalise(view, card_window)
    assert out.flags.c_contiguous
    np.testing.assert_array_equal(out, expected)
    fixed = Intensity.model_validate({"kind": "zscore", "mean": 10.0, "std": 50.0})
    np.testing.assert_array_equal(normalise(view, fixed), ((view - 10.0) / 50.0).astype(np.float32))
    own = Intensity.model_validate({"kind": "zscore"})
    ints = (view * 3).astype(np.int16)
    np.testing.assert_allclose(
        normalise(ints, own), (ints - ints.mean()) / ints.std(), rtol=1e-5, atol=1e-5
    )


# ----------------------------------------------------------------------------- body crop

CARD = {
    "name": "pointwise",
    "version": "0.0.1",
    "architecture": {
        "name": "unet3d",
        "args": {"channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 1},
    },
    "weights": {"file": "model.pt", "sha256": "0" * 64, "format": "state-dict"},
    "modality": "CT",
    "spacing_mm": [1.3, 1.3, 1.6],
    "orientation": "RAS",
    "intensity": {"kind": "window", "lower": -200.0, "upper": 300.0},
    "patch_size": [32, 32, 32],
    "labels": [{"value": 1, "name": "soft tissue"}, {"value": 2, "name": "bone"}],
}
THRESHOLDS = (0.4, 0.8 + 0.4 / 3)  # normalised intensity where the class changes


def _pointwise() -> FinalOutput:
    """Logits ``(0, 10 (x - 0.4), 40 (x - 0.8))``: class 1 for x > 0.4, 2 for x > 0.933."""
    conv = torch.nn.Conv3d(1, 3, 1)
    with torch.no_grad():
        conv.weight[:, 0, 0, 0, 0] = torch.tensor([0.0, 10.0, 40.0])
        conv.bias[:] = torch.tensor([0.0, -4.0, -32.0])
    return FinalOutput(conv).eval()


def _ct(shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> Volume:
    """LPS grid (k -> inferior, j -> posterior, i -> left): a soft-tissue ellipse cylinder
    (40 HU) with a bone rod (300 HU) in air (-1000 HU), a small speck of metal in the air,
    noise 20 HU."""
    nk, nj, ni = shape
    j, i = np.mgrid[0:nj, 0:ni].astype(np.float32)
    y, x = (j - nj * 0.55) * spacing[1], (i - ni * 0.45) * spacing[2]
    plane = np.full((nj, ni), -1000.0, np.float32)
    plane[(x / 18.0) ** 2 + (y / 12.0) ** 2 <= 1.0] = 40.0
    plane[(x - 4.0) ** 2 + y**2 <= 16.0] = 300.0
    array = np.repeat(plane[None], nk, axis=0)
    array[10:14, 4:8, 72:76] = 2000.0  # a speck (< 10 mL) > 10 mm from the body
    array += np.random.default_rng(4).normal(0, 20, shape).astype(np.float32)
    affine = np.array(
        [[0, 0, spacing[2], 5.0], [0, spacing[1], 0, -3.0], [-spacing[0], 0, 0, 40.0], [0, 0, 0, 1]]
    )
    return Volume(array, affine, modality="CT", units="HU")


def _run(image: Volume, card: ModelCard, **params: object) -> tuple[np.ndarray, dict]:
    p = SegmentParams(overlap=0.5, sw_batch=2, bf16=False, **params)
    label_map, facts = segment_volume(image, card, _pointwise(), p, no_progress)
    assert label_map.shape == image.shape
    np.testing.assert_array_equal(label_map.affine, image.affine)
    return label_map.array, facts


@pytest.mark.parametrize("spacing_mm", [[1.3, 1.3, 1.6], [1.0, 1.2, 2.0]])
def test_body_crop_matches_uncropped_inside_and_is_background_outside(spacing_mm):
    image = _ct((30, 64, 80), (2.0, 1.2, 1.0))
    card = ModelCard.model_validate({**CARD, "spacing_mm": spacing_mm})
    cropped, facts = _run(image, card)
    full, full_facts = _run(image, card, crop_body=False)
    crop = facts["body_crop"]
    assert crop["applied"] is True
    assert full_facts["body_crop"] == {"applied": False, "reason": "crop_body is off"}
    assert 0.0 < crop["network_fraction"] < 0.7
    # Same labels inside the box, except at voxels whose intensity sits on a class threshold
    # (float rounding of the blend).
    reo = reorientation(image.affine, card.orientation)
    x = normalise(reo.apply(image.array), card.intensity)
    net_shape = tuple(full_facts["network_grid_shape"])
    x_net = resample_image(x, net_shape, "cpu")[0, 0].numpy()
    near_net = np.zeros(net_shape, np.uint8)
    for t in THRESHOLDS:
        near_net |= np.abs(x_net - t) < 1e-3
    near = nearest_back(near_net, x.shape).astype(bool)
    box = tuple(slice(a, b) for a, b in crop["canonical_box"])
    outside = np.ones(x.shape, bool)
    outside[box] = False
    differ = reo.apply(cropped != full)
    assert not (differ & ~near & ~outside).any()
    assert (full == 2).sum() > 100
    # Everything outside the canonical box is background (the speck too), the body inside it.
    assert not reo.apply(cropped)[outside].any()
    assert reo.apply(full)[outside].any()  # the uncropped run labels the speck
    body = reo.apply((image.array > -500) & (image.array < 1500))  # the speck is not body
    assert not (body & outside).any()
    assert crop["canonical_box"][0][1] - crop["canonical_box"][0][0] < x.shape[0]


def test_no_crop_for_mr_or_empty_ct_and_crop_off_still_works():
    image = _ct((30, 64, 80), (2.0, 1.2, 1.0))
    mr = ModelCard.model_validate(
        {**CARD, "modality": "MR", "intensity": {"kind": "zscore", "mean": 0.0, "std": 500.0}}
    )
    labels, facts = _run(Volume(image.array, image.affine, modality="MR"), mr)
    assert facts["body_crop"]["applied"] is False
    assert "CT only" in facts["body_crop"]["reason"]
    assert set(np.unique(labels)) <= {0, 1, 2}
    air = image.with_array(np.full(image.shape, -1000.0, np.float32))
    labels, facts = _run(air, ModelCard.model_validate(CARD))
    assert facts["body_crop"] == {"applied": False, "reason": "no voxel above -500 HU"}
    assert not labels.any()


def test_network_box_covers_what_nearest_back_reads():
    rng = np.random.default_rng(5)
    for _ in range(50):
        shape = tuple(int(n) for n in rng.integers(20, 90, 3))
        net = tuple(int(n) for n in rng.integers(10, 120, 3))
        box = []
        for n in shape:
            a = int(rng.integers(0, n - 1))
            box.append((a, int(rng.integers(a + 1, n + 1))))
        patch = (16, 16, 16)
        nb = network_box((box[0], box[1], box[2]), shape, net, patch)  # type: ignore[arg-type]
        mask = np.zeros(net, np.uint8)
        mask[tuple(slice(a, b) for a, b in nb)] = 1
        back = nearest_back(mask, shape)  # type: ignore[arg-type]
        assert back[tuple(slice(a, b) for a, b in box)].all()
        for (a, b), m, p in zip(nb, net, patch, strict=True):
            assert 0 <= a < b <= m
            assert b - a >= min(p, m)


def test_body_box_keeps_a_body_cut_by_the_field_of_view():
    hu = np.full((20, 30, 40), -1000.0, np.float32)
    hu[:, 5:25, 0:10] = 50.0  # touches three faces
    box = body_box(hu, (1.0, 1.0, 1.0))
    assert box is not None
    assert box[0] == (0, 20)  # cut by both faces: kept whole
    assert box[1] == (0, 30)  # 5..25 plus 10 mm, clipped
    assert box[2][0] == 0
    assert 20 <= box[2][1] <= 20 + 3  # 10 plus 10 mm, plus at most the 4 mm sampling step - 1
    assert body_box(np.full((8, 8, 8), -1000.0), (1.0, 1.0, 1.0)) is None
