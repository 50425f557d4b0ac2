"""``voxelgate train segment``: a tiny UNet trained on a synthetic MSD dataset (1 CPU thread).

The dataset (written to a temporary folder as NIfTI + dataset.json) holds 32³ volumes with a
bright sphere (label 1) and a dimmer cube (label 2) on a flipped grid, so the worker's
reorientation to RAS is exercised. The trained model folder is installed and run through the
``segment`` pipeline on a new volume.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import torch

from models.pipelines.segment.card import load_card
from models.pipelines.segment.params import SegmentParams
from models.pipelines.segment.pipeline import run as run_pipeline
from models.result import no_progress
from models.training.segment_data import IGNORE, AugmentConfig, SegCase, sparse_slices
from models.training.segment_train import SegTrainConfig, masked_dice_ce, predict, train
from models.volume import Volume
from service.cli_train import add_train_commands
from service.errors import InvalidParameters
from workers.train_segment import run as run_worker

NET_ARGS = {"channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 1}
BRIGHT, DIM, BACKGROUND, NOISE = 250.0, 120.0, -50.0, 20.0  # HU
N = 32
AFFINE = np.diag([-1.0, 1.0, 1.0, 1.0])  # NIfTI RAS: i toward Left (flipped vs RAS)
AFFINE[0, 3] = 31.0


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """One torch thread: the CI machines share their cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _shapes(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A sphere (label 1) and a cube (label 2) in an ``N³`` volume (HU), uint8 labels."""
    grid = np.indices((N, N, N)).astype(np.float32)
    labels = np.zeros((N, N, N), np.uint8)
    r = rng.uniform(4, 8)
    c = rng.uniform(r, N - r, 3)
    labels[((grid - c[:, None, None, None]) ** 2).sum(0) <= r * r] = 1
    h = rng.uniform(3, 7)
    c = rng.uniform(h, N - h, 3)
    labels[(np.abs(grid - c[:, None, None, None]) <= h).all(0)] = 2
    image = BACKGROUND + (labels == 1) * (BRIGHT - BACKGROUND) + (labels == 2) * (DIM - BACKGROUND)
    return (image + rng.normal(0, NOISE, image.shape)).astype(np.float32), labels


def _write_msd(root: Path, n_cases: int, seed: int) -> Path:
    """A Medical Segmentation Decathlon folder with ``n_cases`` synthetic cases."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    rng = np.random.default_rng(seed)
    training = []
    for n in range(n_cases):
        image, label = _shapes(rng)
        name = f"shapes_{n:03d}.nii.gz"
        nib.save(nib.Nifti1Image(image, AFFINE), root / "imagesTr" / name)
        nib.save(nib.Nifti1Image(label, AFFINE), root / "labelsTr" / name)
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    meta = {
        "name": "SyntheticShapes",
        "modality": {"0": "CT"},
        "labels": {"0": "background", "1": "sphere", "2": "cube"},
        "numTraining": n_cases,
        "training": training,
    }
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_train_commands(parser.add_subparsers(dest="command"))
    return parser.parse_args(["train", "segment", *argv])


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * np.logical_and(a, b).sum() / (a.sum() + b.sum()))


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Run the real worker: 300 steps, tiny UNet, 24³ patches, 2 held-out cases."""
    tmp = tmp_path_factory.mktemp("train")
    data = _write_msd(tmp / "msd", 8, seed=0)
    out = tmp / "run"
    args = _args(
        *("--data", str(data), "--out", str(out), "--arch", "unet3d"),
        *("--net-args", json.dumps(NET_ARGS), "--name", "tiny-shapes"),
        *("--steps", "300", "--patch", "24", "24", "24", "--batch-size", "2", "--lr", "5e-3"),
        *("--val-cases", "2", "--validate-every", "100", "--checkpoint-every", "100", "-q"),
    )
    t0 = time.perf_counter()
    assert run_worker(args) == 0
    return {"out": out, "seconds": time.perf_counter() - t0}


def test_worker_reaches_dice_and_writes_a_loadable_card(trained: dict[str, Any]) -> None:
    out = trained["out"]
    metrics = json.loads((out / "metrics.json").read_text())
    val = metrics["validation"]
    print(f"train {trained['seconds']:.1f} s, validation {val}")
    assert val["cases"] == 2
    assert min(val["dice"].values()) > 0.9, val
    card = load_card(out / "tiny-shapes")  # sha256 verified
    assert [lab.name for lab in card.labels] == ["sphere", "cube"]
    assert card.spacing_mm == (1.0, 1.0, 1.0)
    assert card.patch_size == (24, 24, 24)
    assert card.intensity.kind == "window"
    assert f"{val['mean_dice']:.3f}" in card.metrics
    assert "6 training cases" in card.training_data
    assert (out / "checkpoint.pt").exists()


def test_written_model_segments_a_new_volume_in_the_pipeline(
    trained: dict[str, Any], tmp_path: Path
) -> None:
    root = tmp_path / "models"
    shutil.copytree(trained["out"] / "tiny-shapes", root / "tiny-shapes")
    image, truth = _shapes(np.random.default_rng(123))
    # array (k, j, i) with an LPS affine: a plain 1 mm grid
    volume = Volume(image, np.eye(4), modality="CT", units="HU")
    params = SegmentParams.model_validate(
        {"model": "tiny-shapes", "device": "cpu"}, context={"models_root": root}
    )
    seg = run_pipeline({"image": volume}, params, no_progress, models_root=root)
    labels = seg.label_maps["segmentation"].array
    dice = [_dice(labels == v, truth == v) for v in (1, 2)]
    print(f"pipeline Dice {dice}")
    assert min(dice) > 0.9, dice


def test_worker_refuses_resume_without_checkpoint_and_overwrite(
    trained: dict[str, Any], tmp_path: Path
) -> None:

    data = trained["out"].parent / "msd"
    with pytest.raises(InvalidParameters, match=r"checkpoint\.pt exists"):
        run_worker(_args("--data", str(data), "--out", str(trained["out"]), "-q"))
    with pytest.raises(InvalidParameters, match=r"no .*checkpoint\.pt"):
        run_worker(_args("--data", str(data), "--out", str(tmp_path), "--resume", "-q"))


def test_worker_resume_continues_from_the_checkpoint(
    trained: dict[str, Any], tmp_path: Path
) -> None:
    data = trained["out"].parent / "msd"
    common: tuple[str, ...] = ("--data", str(data), "--out", str(tmp_path))
    common += (
        "--net-args",
        json.dumps(NET_ARGS),
        "--patch",
        "24",
        "24",
        "24",
        "--name",
        "tiny",
        "-q",
    )
    assert run_worker(_args(*common, "--steps", "4")) == 0
    assert run_worker(_args(*common, "--steps", "6", "--resume")) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["steps_total"] == 6
    assert metrics["resumed_from_step"] == 4
    assert len(torch.load(tmp_path / "checkpoint.pt", weights_only=True)["history"]) == 6
    args = _args(*common, "--steps", "8", "--resume", "--arch", "unetpp")
    args.patch, args.net_args = [32, 32, 32], json.dumps({"features": [4, 4, 8, 8, 16, 4]})
    with pytest.raises(InvalidParameters, match="arch"):
        run_worker(args)
    other = ("--data", str(data), "--out", str(tmp_path / "pp"), "--patch", "16", "16", "16")
    with pytest.raises(InvalidParameters, match="unetpp needs patch sides"):
        run_worker(_args(*other, "--arch", "unetpp", "-q"))


def _cases(n: int, seed: int, every: int = 0) -> list[SegCase]:
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        image, label = _shapes(rng)
        norm = ((np.clip(image, -200, 300) + 200) / 500).astype(np.float32)
        out.append(SegCase(f"c{k}", norm, sparse_slices(label, every) if every else label))
    return out


def _config(steps: int, **changes: object) -> SegTrainConfig:
    base: dict[str, object] = {
        "arch": "unet3d",
        "net_args": NET_ARGS,
        "n_labels": 2,
        "patch": (24, 24, 24),
        "steps": steps,
        "batch_size": 2,
        "lr": 5e-3,
        "checkpoint_every": 3,
        "augment": AugmentConfig(elastic_probability=0.5),
    }
    base.update(changes)
    return SegTrainConfig(**base)  # type: ignore[arg-type]


def test_resume_repeats_an_uninterrupted_run() -> None:
    cases = _cases(3, seed=1)
    config = _config(6)
    saved: list[dict[str, object]] = []
    full = train(config, cases, [], save_checkpoint=saved.append)
    half = next(s for s in saved if s["step"] == 3)
    resumed = train(config, cases, [], resume_state=half)
    assert resumed.state["step"] == 6
    assert resumed.metrics["resumed_from_step"] == 3
    for key, value in full.state["model"].items():
        torch.testing.assert_close(resumed.state["model"][key], value, rtol=1e-5, atol=1e-6)
    assert [h["loss"] for h in resumed.state["history"]] == pytest.approx(
        [h["loss"] for h in full.state["history"]], rel=1e-5
    )


def test_masked_loss_ignores_unlabelled_voxels_and_absent_classes() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 6, 6, 6, generator=gen, requires_grad=True)
    target = torch.randint(0, 3, (2, 6, 6, 6), generator=gen)
    target[:, :, :, ::2] = IGNORE
    loss = masked_dice_ce(logits, target)
    loss.backward()
    assert logits.grad is not None
    ignored = (target == IGNORE)[:, None].expand_as(logits)
    assert torch.all(logits.grad[ignored] == 0)
    assert torch.any(logits.grad[~ignored] != 0)
    changed = logits.detach().clone()
    changed[ignored] = torch.randn(int(ignored.sum()), generator=gen) * 10
    assert float(masked_dice_ce(changed, target)) == pytest.approx(float(loss.detach()), rel=1e-6)
    # label 2 absent in case 0: background and label 2 logits are interchangeable there
    present = torch.tensor([[True, True, False], [True, True, True]])
    t = torch.where(target == 2, 0, target)
    swapped = logits.detach().clone()
    swapped[0, [0, 2]] = swapped[0, [2, 0]]
    a = masked_dice_ce(logits.detach(), t, present)
    b = masked_dice_ce(swapped, t, present)
    assert float(a) == pytest.approx(float(b), rel=1e-6)
    assert float(masked_dice_ce(swapped, t)) != pytest.approx(float(a), rel=1e-3)


def test_sparse_annotation_every_fourth_slice_still_trains() -> None:
    train_cases = _cases(6, seed=2, every=4)
    assert np.mean(train_cases[0].label == IGNORE) == pytest.approx(0.75)
    outcome = train(_config(500, checkpoint_every=1000, augment=AugmentConfig()), train_cases, [])
    dice = []
    for case in _cases(2, seed=3):
        pred = predict(outcome.model, case.image, (24, 24, 24))
        dice += [_dice(pred == v, case.label == v) for v in (1, 2)]
    print(f"sparse-annotation Dice on fully labelled held-out cases {dice}")
    assert min(dice) > 0.8, dice
