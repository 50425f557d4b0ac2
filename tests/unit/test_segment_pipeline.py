"""``segment``: a tiny MONAI UNet trained here on synthetic shapes, run through the pipeline.

The model (2 labels: a bright sphere, a dimmer cube) is trained for a few seconds on 32³
volumes in the canonical frame at 1 mm, saved as state dict + card (sha256) in a temporary
models root, and the pipeline is pointed at that root (``models_root=`` / validation context).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.losses import DiceCELoss
from monai.networks.nets import UNet

from models.errors import InputRejected, InvalidParameters
from models.labels import LabelMap
from models.pipelines.segment.card import Mirroring, ModelCardInvalid, load_card
from models.pipelines.segment.geometry import grid_affine, nearest_back, reorientation
from models.pipelines.segment.inference import fill_holes, largest_component
from models.pipelines.segment.networks import MirroredOutput, build_network, load_network
from models.pipelines.segment.params import SegmentParams
from models.pipelines.segment.pipeline import run
from models.provenance import file_sha256
from models.registry import get_spec, validate_params
from models.result import no_progress
from models.volume import Volume

NET_ARGS = {"channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 1}
BRIGHT, DIM, BACKGROUND, NOISE = 250.0, 120.0, -50.0, 20.0  # HU


def _shapes(rng: np.random.Generator, n: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """A sphere (label 1) and an axis-aligned cube (label 2) in an ``n³`` volume (HU)."""
    grid = np.indices((n, n, n)).astype(np.float32)
    labels = np.zeros((n, n, n), np.int64)
    r = rng.uniform(4, 10)
    c = rng.uniform(r, n - r, 3)
    labels[((grid - c[:, None, None, None]) ** 2).sum(0) <= r * r] = 1
    h = rng.uniform(3, 9)
    c = rng.uniform(h, n - h, 3)
    labels[(np.abs(grid - c[:, None, None, None]) <= h).all(0)] = 2
    image = BACKGROUND + (labels == 1) * (BRIGHT - BACKGROUND) + (labels == 2) * (DIM - BACKGROUND)
    return (image + rng.normal(0, NOISE, image.shape)).astype(np.float32), labels


def _card(sha: str, **changes: object) -> dict[str, object]:
    card: dict[str, object] = {
        "name": "tiny-shapes",
        "version": "0.0.1",
        "architecture": {"name": "unet3d", "args": NET_ARGS},
        "weights": {"file": "model.pt", "sha256": sha, "format": "state-dict"},
        "modality": "CT",
        "spacing_mm": [1.0, 1.0, 1.0],
        "orientation": "RAS",
        "intensity": {"kind": "window", "lower": -200.0, "upper": 300.0},
        "patch_size": [32, 32, 32],
        "labels": [
            {"value": 1, "name": "Bright sphere"},
            {"value": 2, "name": "Dim cube", "type": ["85756007", "SCT", "Tissue"]},
        ],
        "training_data": "synthetic spheres and cubes (test only)",
        "metrics": "none",
    }
    card.update(changes)
    return card


def _install(root: Path, weights: Path, fmt: str = "state-dict", **changes: object) -> Path:
    """Install ``weights`` as model ``tiny-shapes`` under ``root`` with a matching card."""
    folder = root / "tiny-shapes"
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(weights, folder / weights.name)
    card = _card(file_sha256(weights), **changes)
    card["weights"] = {**card["weights"], "file": weights.name, "format": fmt}
    (folder / "card.json").write_text(json.dumps(card))
    return folder


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One torch thread: the CI machines share their cores (two threads on one free core
    made training 30x slower here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """Train the tiny UNet (a few seconds on one CPU core); return its state-dict path."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    net = UNet(spatial_dims=3, in_channels=1, out_channels=3, **NET_ARGS)
    opt = torch.optim.Adam(net.parameters(), lr=5e-3)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    t0 = time.perf_counter()
    for _ in range(300):
        batch = [_shapes(rng) for _ in range(2)]
        x = torch.from_numpy(np.stack([(np.clip(b[0], -200, 300) + 200) / 500 for b in batch]))
        y = torch.from_numpy(np.stack([b[1] for b in batch]))
        opt.zero_grad()
        loss = loss_fn(net(x[:, None].float()), y[:, None])
        loss.backward()
        opt.step()
    train_s = time.perf_counter() - t0
    folder = tmp_path_factory.mktemp("weights")
    path = folder / "model.pt"
    torch.save(net.state_dict(), path)
    net.eval()
    script = folder / "model.ts"
    torch.jit.save(torch.jit.trace(net, torch.zeros(1, 1, 32, 32, 32)), str(script))
    return {"state_dict": path, "torchscript": script, "train_s": train_s}


def _oblique_case() -> tuple[Volume, np.ndarray]:
    """Oblique, flipped, anisotropic CT grid with a sphere and a cube placed in LPS mm."""
    spacing = np.array([2.5, 0.9, 1.2])  # k, j, i (mm)
    # k toward Inferior, j toward Left, i toward Anterior, then a 20 degree tilt.
    base = np.array([[0.0, 1.0, 0.0], [0.0, 0.0, -1.0], [-1.0, 0.0, 0.0]])
    a = np.deg2rad(20)
    tilt = np.array([[np.cos(a), 0, np.sin(a)], [0, 1, 0], [-np.sin(a), 0, np.cos(a)]])
    affine = np.eye(4)
    affine[:3, :3] = tilt @ base * spacing
    affine[:3, 3] = [-40.0, 12.0, 80.0]
    shape = (20, 44, 40)
    grid = Volume(np.zeros(shape, np.float32), affine, modality="CT", units="HU")
    idx = np.indices(shape).reshape(3, -1).T
    world = grid.index_to_lps(idx)
    centre = grid.index_to_lps(np.array(shape) / 2)
    direction = grid.direction
    rel_s = world - (centre + direction @ np.array([-8.0, -5.0, -6.0]))
    rel_c = world - (centre + direction @ np.array([12.0, 9.0, 8.0]))
    labels = np.zeros(len(world), np.int64)
    labels[(rel_s**2).sum(1) <= 9.0**2] = 1
    labels[(np.abs(rel_c @ direction) <= 8.0).all(1)] = 2
    labels = labels.reshape(shape)
    rng = np.random.default_rng(7)
    image = BACKGROUND + (labels == 1) * (BRIGHT - BACKGROUND) + (labels == 2) * (DIM - BACKGROUND)
    image = (image + rng.normal(0, NOISE, shape)).astype(np.float32)
    return grid.with_array(image), labels


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * np.logical_and(a, b).sum() / (a.sum() + b.sum()))


def _segment(root: Path, image: Volume, **params: object) -> LabelMap:
    p = SegmentParams.model_validate(
        {"model": "tiny-shapes", "device": "cpu", **params}, context={"models_root": root}
    )
    return run({"image": image}, p, no_progress, models_root=root).label_maps["segmentation"]


def test_oblique_volume_segmented_on_its_own_grid(trained, tmp_path):
    root = tmp_path / "models"
    _install(root, trained["state_dict"])
    image, truth = _oblique_case()
    t0 = time.perf_counter()
    params = SegmentParams.model_validate(
        {"model": "tiny-shapes", "device": "cpu", "overlap": 0.25}, context={"models_root": root}
    )
    result = run({"image": image}, params, no_progress, models_root=root)
    infer_s = time.perf_counter() - t0
    seg = result.label_maps["segmentation"]
    assert seg.shape == image.shape
    np.testing.assert_array_equal(seg.affine, image.affine)
    dice = [_dice(seg.array == v, truth == v) for v in (1, 2)]
    print(f"train {trained['train_s']:.1f} s, inference {infer_s:.2f} s, Dice {dice}")
    assert min(dice) > 0.9, dice
    assert set(np.unique(seg.array)) <= {0, 1, 2}  # labels never interpolated
    assert np.issubdtype(seg.array.dtype, np.integer)
    assert result.provenance.weights_sha256 == file_sha256(trained["state_dict"])
    assert result.measurements["labels"]["Bright sphere"]["voxel_count"] == (seg.array == 1).sum()
    assert result.measurements["geometry"]["source_axes_to_canonical"]["perm"] != [0, 1, 2]


def test_mirroring_is_equivariant_and_swaps_lateral_labels(trained):
    """Mirrored-averaged logits of a flipped window are the flipped, label-swapped logits of the
    window (exactly what a left-right symmetric model should give); the raw network is not."""
    card = load_card(
        _install(Path(str(trained["state_dict"])).parent / "mirror", trained["state_dict"]),
        verify_sha256=False,
    )
    card = card.model_copy(update={"mirroring": Mirroring(axes=(0, 2), swap=((1, 2),))})
    net = build_network(card)
    net.net.load_state_dict(torch.load(trained["state_dict"], weights_only=True))
    mirrored = MirroredOutput(net, card)
    x = torch.from_numpy(_shapes(np.random.default_rng(5))[0])[None, None] / 500.0
    swap = torch.tensor([0, 2, 1])
    with torch.no_grad():
        for dims in ((2,), (4,), (2, 4)):
            expected = torch.flip(mirrored(x), dims)
            if 2 in dims:  # the left-right axis of RAS: labels 1 and 2 trade places
                expected = expected.index_select(1, swap)
            torch.testing.assert_close(mirrored(torch.flip(x, dims)), expected)
        raw = torch.flip(net(x), (2,)).index_select(1, swap)
        assert (net(torch.flip(x, (2,))) - raw).abs().max() > 1e-3
    assert len(mirrored.flips) == 3  # every combination of two axes besides the identity


def test_mirroring_option_runs_and_is_refused_without_card_support(trained, tmp_path):
    image, truth = _oblique_case()
    plain = _install(tmp_path / "plain", trained["state_dict"]).parent
    with pytest.raises(ValueError, match="allows no test-time mirroring"):
        _segment(plain, image, mirroring=True)
    root = _install(
        tmp_path / "mirror", trained["state_dict"], mirroring={"axes": [0, 1, 2]}
    ).parent
    p = SegmentParams.model_validate(
        {"model": "tiny-shapes", "device": "cpu", "mirroring": True}, context={"models_root": root}
    )
    result = run({"image": image}, p, no_progress, models_root=root)
    seg = result.label_maps["segmentation"].array
    assert min(_dice(seg == v, truth == v) for v in (1, 2)) > 0.9
    assert result.measurements["geometry"]["test_time_mirroring"] == {"axes": [0, 1, 2], "swap": []}
    assert result.provenance.parameters["mirroring"] is True


@pytest.mark.parametrize(
    ("mirroring", "message"),
    [
        ({"axes": [0, 0]}, "distinct tensor axes"),
        ({"axes": [3]}, "distinct tensor axes"),
        ({"axes": [1], "swap": [[1, 2]]}, "need the left-right axis"),
        ({"axes": [0], "swap": [[1, 3]]}, "labels the card does not have"),
        ({"axes": [0], "swap": [[1, 2], [2, 1]]}, "disjoint"),
    ],
)
def test_inconsistent_mirroring_is_refused(trained, tmp_path, mirroring, message):
    folder = _install(tmp_path, trained["state_dict"], mirroring=mirroring)
    with pytest.raises(ModelCardInvalid, match=message):
        load_card(folder)


def test_torchscript_and_bundle_give_the_state_dict_output(trained, tmp_path):
    image, _ = _oblique_case()
    ref = _segment(_install(tmp_path / "sd", trained["state_dict"]).parent, image)
    ts_root = _install(tmp_path / "ts", trained["torchscript"], "torchscript").parent
    np.testing.assert_array_equal(_segment(ts_root, image).array, ref.array)
    folder = _install(
        tmp_path / "bundle",
        trained["state_dict"],
        "monai-bundle",
        architecture={"name": "monai-bundle"},
    )
    (folder / "configs").mkdir()
    net_def = {"_target_": "monai.networks.nets.UNet", "spatial_dims": 3, "in_channels": 1}
    net_def |= {"out_channels": 3, "channels": "@channels", "strides": [2, 2], "num_res_units": 1}
    config = {"channels": [4, 8, 16], "network_def": net_def, "network": "$@network_def.to(0)"}
    (folder / "configs" / "inference.json").write_text(json.dumps(config))
    card = json.loads((folder / "card.json").read_text())
    card["weights"]["bundle_config"] = "configs/inference.json"
    (folder / "card.json").write_text(json.dumps(card))
    np.testing.assert_array_equal(_segment(folder.parent, image).array, ref.array)
    # A '$' expression in the network arguments is refused, never evaluated.
    config["network_def"]["channels"] = "$[4, 8, 16]"
    (folder / "configs" / "inference.json").write_text(json.dumps(config))
    with pytest.raises(ModelCardInvalid, match=r"never evaluates '\$' expressions"):
        load_card(folder)
    with pytest.raises(ValueError, match=r"network_def.channels = '\$\[4, 8, 16\]'"):
        _segment(folder.parent, image)  # refused already by parameter validation
    config["network_def"] = {"_target_": "torch.nn.Identity"}
    (folder / "configs" / "inference.json").write_text(json.dumps(config))
    with pytest.raises(ModelCardInvalid, match="not one voxelgate builds"):
        load_card(folder)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"labels": [{"value": 1, "name": "a"}, {"value": 3, "name": "b"}]}, "must be 1..2"),
        ({"labels": [{"value": 1, "name": "a"}, {"value": 1, "name": "b"}]}, "must be 1..2"),
        ({"labels": [{"value": 1, "name": "a"}, {"value": 2, "name": "a"}]}, "names must be"),
        ({"spacing_mm": [1.0, 0.0, 1.0]}, "spacing must be a finite number > 0"),
        ({"patch_size": [32, 30, 32]}, r"multiples of the network's downsampling factor \[4, 4"),
        ({"orientation": "RAX"}, "3 of L/R"),
        ({"orientation": "RLS"}, "names one patient axis twice"),
        ({"intensity": {"kind": "window", "lower": 10, "upper": 0}}, "lower < upper"),
        ({"name": "other"}, "differs from its folder name"),
    ],
)
def test_inconsistent_cards_are_refused(trained, tmp_path, changes, message):
    folder = _install(tmp_path, trained["state_dict"], **changes)
    with pytest.raises(ModelCardInvalid, match=message):
        load_card(folder)


def test_sha256_mismatch_and_channel_mismatch_are_refused(trained, tmp_path):
    folder = _install(tmp_path, trained["state_dict"])
    with (folder / "model.pt").open("ab") as fh:
        fh.write(b"\0")
    with pytest.raises(ModelCardInvalid, match=r"have sha256 .* the card says"):
        load_card(folder)
    load_card(folder, verify_sha256=False)  # parameter validation does not hash
    arch = {"name": "unet3d", "args": {**NET_ARGS, "out_channels": 4}}
    with pytest.raises(ModelCardInvalid, match="out_channels=4 contradicts the card"):
        load_card(_install(tmp_path / "b", trained["state_dict"], architecture=arch))


def test_a_weights_file_that_is_not_torch_is_refused(tmp_path):
    junk = tmp_path / "model.pt"
    junk.write_bytes(b"not a checkpoint at all")  # sha256 matches: the card names this file
    folder = _install(tmp_path / "m", junk)
    with pytest.raises(ModelCardInvalid, match="not a weights file"):
        load_network(folder, "cpu")


def test_unknown_or_missing_model_is_refused_listing_installed(trained, tmp_path):
    with pytest.raises(
        InvalidParameters,
        match=r"'head-neck-oars' is not installed \(did you mean 'head-neck-oars-[a-z0-9]+'\?\)"
        r".*: head-neck-oars-dynunet, head-neck-oars-unet3d, head-neck-oars-unetpp",
    ):
        validate_params(get_spec("segment"), {"model": "head-neck-oars"})
    root = _install(tmp_path, trained["state_dict"]).parent
    with pytest.raises(ValueError, match=r"did you mean 'tiny-shapes'\?.*: tiny-shapes"):
        SegmentParams.model_validate({"model": "tiny-shape"}, context={"models_root": root})
    image, _ = _oblique_case()
    with pytest.raises(InputRejected, match="no segmentation model in this folder"):
        run({"image": image}, SegmentParams(), no_progress, models_root=tmp_path / "empty")
    with pytest.raises(InputRejected, match="segments CT images, the input is MR"):
        _segment(root, Volume(image.array, image.affine, modality="MR"))


def test_volume_too_small_for_the_window_is_refused(trained, tmp_path):
    root = _install(tmp_path, trained["state_dict"]).parent
    with pytest.raises(InputRejected, match="volume too small for the model's window"):
        _segment(root, Volume(np.zeros((4, 40, 40), np.float32), np.eye(4), modality="CT"))


def test_reorientation_and_nearest_back_are_exact():
    image, truth = _oblique_case()
    reo = reorientation(image.affine, "RAS")
    canon = reo.apply(truth)
    np.testing.assert_array_equal(reo.invert(canon), truth)
    canon_affine = reo.affine(image.affine, image.shape)
    # The same voxel has the same LPS position in both grids; the canonical axes point R, A, S.
    src = np.array([3, 17, 29])
    canon_index = [
        image.shape[a] - 1 - src[a] if f else src[a]
        for a, f in zip(reo.perm, reo.flip, strict=True)
    ]
    np.testing.assert_allclose(
        canon_affine[:3, :3] @ canon_index + canon_affine[:3, 3], image.index_to_lps(src)
    )
    assert canon_affine[0, 0] < 0  # R = -x of LPS
    assert canon_affine[1, 1] < 0  # A = -y
    assert canon_affine[2, 2] > 0  # S = +z
    labels = np.random.default_rng(0).integers(0, 3, (5, 7, 9)).astype(np.uint8)
    np.testing.assert_array_equal(nearest_back(labels, (5, 7, 9)), labels)
    up = nearest_back(labels, (10, 14, 27))  # every fine voxel copies the coarse one it lies in
    np.testing.assert_array_equal(up, labels.repeat(2, 0).repeat(2, 1).repeat(3, 2))
    fine = grid_affine(np.eye(4), (5, 7, 9), (10, 14, 27))
    np.testing.assert_allclose(fine[:3, 3], [-0.25, -0.25, -1 / 3])


def test_postprocessing_keeps_largest_component_and_fills_holes():
    labels = np.zeros((12, 12, 12), np.uint8)
    labels[1:8, 1:8, 1:8] = 1
    labels[3:5, 3:5, 3:5] = 0  # enclosed hole
    labels[10:12, 10:12, 10:12] = 1  # small island
    out = fill_holes(largest_component(labels.copy()))
    assert out[4, 4, 4] == 1
    assert out[11, 11, 11] == 0
    assert (out == 1).sum() == 7**3


def test_unetpp_card_and_bf16_run(trained, tmp_path):
    from monai.networks.nets import BasicUNetPlusPlus

    features = [4, 4, 8, 8, 16, 4]
    net = BasicUNetPlusPlus(spatial_dims=3, in_channels=1, out_channels=3, features=features)
    torch.save({"state_dict": net.state_dict()}, tmp_path / "unetpp.pt")
    arch = {"name": "unetpp", "args": {"features": features, "deep_supervision": True}}
    root = _install(tmp_path / "pp", tmp_path / "unetpp.pt", architecture=arch).parent
    image, _ = _oblique_case()
    seg = _segment(root, image)  # untrained: only the wiring (list output, checkpoint dict)
    assert seg.shape == image.shape
    assert set(np.unique(seg.array)) <= {0, 1, 2}
    with pytest.raises(ModelCardInvalid, match=r"downsampling factor \[16, 16, 16\]"):
        load_card(
            _install(
                tmp_path / "bad", tmp_path / "unetpp.pt", architecture=arch, patch_size=[32, 32, 24]
            )
        )
    sd_root = _install(tmp_path / "sd", trained["state_dict"]).parent
    fp32 = _segment(sd_root, image, bf16=False).array
    bf16 = _segment(sd_root, image, bf16=True).array
    assert (fp32 == bf16).mean() > 0.99
