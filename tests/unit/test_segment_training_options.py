"""Training options for lateral anatomy and official splits (``voxelgate train segment``).

* A left-right flip with ``mirror_pairs`` swaps the paired labels and the case's ``present``
  labels the same way (a mirrored right parotid is a left parotid).
* ``flip_axes`` restricts the flips; bf16 training runs and is refused with a bad name.
* A dataset ``validation`` list is used as the held-out set (an official split), the spacing and
  the intensity window come from the training cases only, and label codes reach the card.
* ``voxelgate dataset openkbp`` on the real OpenKBP folder: official splits, QC flags out,
  ``present`` computed from the contours.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from models.errors import InputRejected
from models.pipelines.segment.card import Mirroring, load_card
from models.pipelines.segment.params import SegmentParams
from models.pipelines.segment.pipeline import run as run_pipeline
from models.provenance import file_sha256
from models.result import no_progress
from models.training.segment_data import AugmentConfig, SegCase, augment, make_batch
from models.training.segment_train import InitialWeights, SegTrainConfig, train, training_loss
from models.volume import Volume
from service.cli_train import add_dataset_commands, add_train_commands
from service.errors import InvalidParameters
from workers.openkbp_dataset import build_dataset
from workers.train_segment import run as run_worker

OPENKBP = Path(__file__).resolve().parents[3] / "shared" / "data" / "openkbp"


def _lateral_case() -> SegCase:
    """Label 1 on the low side of axis 0, label 2 on the high side; only label 1 annotated."""
    label = np.zeros((8, 8, 8), np.uint8)
    label[1:3, 2:6, 2:6] = 1
    image = np.linspace(0, 1, 8 * 8 * 8, dtype=np.float32).reshape(8, 8, 8)
    return SegCase("lateral", image, label, present=(1,))


def test_mirror_swaps_labels_and_present() -> None:
    case = _lateral_case()
    config = AugmentConfig(
        flip_axes=(0,),
        mirror_pairs=((1, 2),),
        rot90=False,
        elastic_probability=0.0,
        intensity_scale=0.0,
        intensity_shift=0.0,
        foreground_fraction=0.0,
    )
    seen = {True: 0, False: 0}
    for step in range(16):
        images, labels, present = make_batch(
            [case], seed=0, step=step, batch_size=1, patch=(8, 8, 8), n_labels=2, config=config
        )
        mirrored = bool(np.any(labels[0] == 2))
        seen[mirrored] += 1
        if mirrored:
            assert not np.any(labels[0] == 1)
            assert np.array_equal(labels[0] == 2, np.flip(case.label == 1, 0))
            assert np.array_equal(images[0, 0], np.flip(case.image, 0))
            assert present[0].tolist() == [True, False, True]
        else:
            assert np.array_equal(labels[0], case.label)
            assert present[0].tolist() == [True, True, False]
    assert seen[True], seen
    assert seen[False], seen


def test_flip_axes_limit_the_flips() -> None:
    case = _lateral_case()
    config = AugmentConfig(
        flip_axes=(0,),
        rot90=False,
        elastic_probability=0.0,
        intensity_scale=0.0,
        intensity_shift=0.0,
    )
    for step in range(12):
        image, _, _ = augment(case.image, case.label, np.random.default_rng(step), config)
        assert np.array_equal(image, case.image) or np.array_equal(image, np.flip(case.image, 0))
    with pytest.raises(InputRejected, match="flip_axes"):
        AugmentConfig(flip_axes=(3,))
    with pytest.raises(InputRejected, match="disjoint pairs"):
        AugmentConfig(mirror_pairs=((1, 2), (2, 3)))


def test_bf16_training_runs_and_bad_precision_is_refused() -> None:
    rng = np.random.default_rng(0)
    label = np.zeros((24, 24, 24), np.uint8)
    label[6:14, 6:14, 6:14] = 1
    image = (label + rng.normal(0, 0.1, label.shape)).astype(np.float32)
    config = SegTrainConfig(
        net_args={"channels": [4, 8], "strides": [2], "num_res_units": 0},
        patch=(16, 16, 16),
        steps=3,
        precision="bf16",
        checkpoint_every=10,
    )
    outcome = train(config, [SegCase("c", image, label)], [SegCase("v", image, label)])
    assert outcome.state["step"] == 3
    assert np.isfinite([h["loss"] for h in outcome.state["history"]]).all()
    assert outcome.metrics["validation"]["cases"] == 1
    with pytest.raises(InputRejected, match="precision"):
        SegTrainConfig(precision="fp8")


def _write(root: Path, name: str, image: np.ndarray, label: np.ndarray) -> dict[str, str]:
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    nib.save(nib.Nifti1Image(image, affine), root / f"{name}_img.nii.gz")
    nib.save(nib.Nifti1Image(label, affine), root / f"{name}_lab.nii.gz")
    return {"case": name, "image": f"{name}_img.nii.gz", "label": f"{name}_lab.nii.gz"}


def _block_dataset(
    root: Path, prefix: str, size: int, box: tuple[slice, ...], hu: float, noise: float, seed: int
) -> None:
    """Three ``size``³ cases with label 1 (a block of ``hu``) in ``box``; ``root/dataset.json``."""
    rng = np.random.default_rng(seed)
    entries = []
    for n in range(3):
        label = np.zeros((size, size, size), np.uint8)
        label[box] = 1
        image = (hu * label + rng.normal(0, noise, label.shape)).astype(np.float32)
        entries.append(_write(root, f"{prefix}{n}", image, label))
    meta = {"labels": {"0": "background", "1": "Block"}, "training": entries}
    (root / "dataset.json").write_text(json.dumps(meta))


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    add_train_commands(sub)
    add_dataset_commands(sub)
    return parser.parse_args(list(argv))


def test_validation_list_is_the_held_out_set_and_codes_reach_the_card(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    entries = []
    for n in range(4):
        label = np.zeros((24, 24, 24), np.uint8)
        label[4:12, 4:12, 4:12] = 1
        image = (100.0 * label + rng.normal(0, 5, label.shape)).astype(np.float32)
        entries.append(_write(tmp_path, f"c{n}", image, label))
    # the validation case is very bright: if it leaked into the intensity window the card's
    # upper bound would move far above 100 HU
    label = np.zeros((24, 24, 24), np.uint8)
    label[4:12, 4:12, 4:12] = 1
    val = _write(tmp_path, "v0", (5000.0 * label).astype(np.float32), label)
    codes = {"1": {"type": ["91609006", "SCT", "Mandible"], "colour": [1, 2, 3]}}
    meta = {
        "labels": {"0": "background", "1": "Mandible"},
        "training": entries,
        "validation": [val],
        "label_codes": codes,
    }
    (tmp_path / "dataset.json").write_text(json.dumps(meta))
    out = tmp_path / "run"
    args = _args(
        "train",
        "segment",
        "--data",
        str(tmp_path),
        "--out",
        str(out),
        "--name",
        "m",
        "--net-args",
        json.dumps({"channels": [4, 8], "strides": [2], "num_res_units": 0}),
        "--patch",
        "16",
        "16",
        "16",
        "--steps",
        "2",
        "-q",
    )
    assert run_worker(args) == 0
    card = load_card(out / "m")
    assert "4 training cases" in card.training_data
    assert "v0" in card.training_data
    assert card.intensity.upper is not None
    assert card.intensity.upper < 200
    assert card.labels[0].type is not None
    assert card.labels[0].type[2] == "Mandible"
    assert card.labels[0].category is not None
    assert card.labels[0].category[0] == "123037004"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["validation"]["cases"] == 1
    # the compact checkpoint shipped in the model folder resumes a later run
    shipped = out / "m" / "checkpoint.pt"
    digest = (out / "m" / "checkpoint.pt.sha256").read_text().split()[0]
    assert digest == file_sha256(shipped)
    state = torch.load(shipped, weights_only=True)
    assert all(v.dtype == torch.bfloat16 for v in state["model"].values() if v.is_floating_point())
    moments = next(iter(state["optimizer"]["state"].values()))
    assert moments["exp_avg_sq"].dtype == torch.bfloat16
    again = tmp_path / "again"
    again.mkdir()
    shutil.copy(shipped, again / "checkpoint.pt")
    args.out, args.steps, args.resume = str(again), 4, True
    assert run_worker(args) == 0
    resumed = json.loads((again / "metrics.json").read_text())
    assert (resumed["resumed_from_step"], resumed["steps_total"]) == (2, 4)
    args.resume = False
    meta["validation"] = [entries[0]]
    (tmp_path / "dataset.json").write_text(json.dumps(meta))
    args.out = str(tmp_path / "run2")
    with pytest.raises(InvalidParameters, match="both in training and validation"):
        run_worker(args)


@pytest.mark.skipif(not OPENKBP.is_dir(), reason="../shared/data/openkbp not present")
def test_openkbp_dataset_uses_official_splits_and_drops_flagged_cases(tmp_path: Path) -> None:
    dataset = build_dataset(OPENKBP)
    flags = json.loads((OPENKBP / "splits.json").read_text())["qc_flags"]
    names = {e["case"] for e in dataset["training"]} | {e["case"] for e in dataset["validation"]}
    assert len(dataset["training"]) == 169
    assert len(dataset["validation"]) == 30
    assert {x["case"] for x in dataset["excluded"]} == set(flags)
    assert not names & {k.split("/")[1] for k in flags}
    # present = organs with voxels; check two cases against their label files
    for entry in dataset["training"][:2] + dataset["validation"][:1]:
        values = np.unique(np.asarray(nib.load(entry["label"]).dataobj))
        assert entry["present"] == [int(v) for v in values if v > 0]
    counts = [sum(v in e["present"] for e in dataset["training"]) for v in range(1, 8)]
    assert counts[4] < 100 < counts[1], counts  # esophagus often not contoured, the cord is
    out = tmp_path / "openkbp.json"
    assert (
        _args("dataset", "openkbp", "--src", str(OPENKBP), "--out", str(out)).func(
            _args("dataset", "openkbp", "--src", str(OPENKBP), "--out", str(out))
        )
        == 0
    )
    assert json.loads(out.read_text())["mirror_pairs"] == ["3:4"]


def test_dynunet_baseline_trains_and_runs_in_the_pipeline(tmp_path: Path) -> None:
    _block_dataset(tmp_path, "d", 32, (slice(8, 20), slice(10, 22), slice(6, 18)), 200.0, 10.0, 3)
    net_args = {
        "kernel_size": [3, 3, 3],
        "strides": [1, 2, 2],
        "upsample_kernel_size": [2, 2],
        "filters": [4, 8, 16],
        "norm_name": "instance",
    }
    out = tmp_path / "run"
    args = _args(
        *("train", "segment", "--data", str(tmp_path), "--out", str(out), "--name", "dyn"),
        *("--arch", "dynunet", "--net-args", json.dumps(net_args), "--steps", "3"),
        *("--patch", "16", "16", "16", "--val-cases", "1", "-q"),
    )
    assert run_worker(args) == 0
    card = load_card(out / "dyn")
    assert card.architecture.name == "dynunet"
    noise = np.random.default_rng(3).normal(0, 10, (20, 24, 28)).astype(np.float32)
    image = Volume(noise, np.eye(4), modality="CT")
    params = SegmentParams.model_validate(
        {"model": "dyn", "device": "cpu"}, context={"models_root": out}
    )
    result = run_pipeline({"image": image}, params, no_progress, models_root=out)
    assert result.label_maps["segmentation"].shape == image.shape


def test_balanced_foreground_centres_small_organs_as_often_as_large_ones() -> None:
    from models.training.segment_data import sample_patch

    label = np.zeros((40, 40, 40), np.uint8)
    label[2:30, 2:30, 2:30] = 1  # large organ
    label[35:37, 35:37, 35:37] = 2  # 8 voxels
    case = SegCase("sizes", np.zeros(label.shape, np.float32), label)

    def small_share(balanced: bool) -> float:
        hits = 0
        for n in range(200):
            _, lab = sample_patch(case, (8, 8, 8), np.random.default_rng(n), True, balanced)
            hits += bool(np.any(lab == 2))
        return hits / 200

    plain, balanced = small_share(False), small_share(True)
    assert plain < 0.05, plain
    assert 0.35 < balanced < 0.65, balanced


def test_initial_weights_start_a_new_run_from_a_trained_model(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    label = np.zeros((20, 20, 20), np.uint8)
    label[6:14, 6:14, 6:14] = 1
    image = (label + rng.normal(0, 0.1, label.shape)).astype(np.float32)
    cases = [SegCase("c", image, label)]
    config = SegTrainConfig(
        net_args={"channels": [4, 8], "strides": [2], "num_res_units": 0},
        patch=(16, 16, 16),
        steps=30,
        checkpoint_every=100,
    )
    trained = train(config, cases, [])
    fp16 = {k: v.half() for k, v in trained.model.state_dict().items()}
    # one step with a negligible learning rate: the run starts where the trained model ended
    # (its first loss is the trained model's on that batch, below a fresh network's)
    short = SegTrainConfig(**{**config.__dict__, "steps": 1, "lr": 1e-9})
    fresh = train(short, cases, [])
    warm = train(short, cases, [], initial=InitialWeights(fp16, "model.pt sha256 x"))
    assert warm.metrics["initialised_from"] == "model.pt sha256 x"
    assert fresh.metrics["initialised_from"] is None
    assert warm.state["initialised_from"] == "model.pt sha256 x"
    first = warm.state["history"][0]["loss"]
    images, labels, present = make_batch(
        cases, seed=0, step=0, batch_size=2, patch=(16, 16, 16), n_labels=1, config=config.augment
    )
    with torch.no_grad():
        expected = training_loss(
            trained.model(torch.from_numpy(images)),
            torch.from_numpy(labels),
            torch.from_numpy(present),
        )
    assert first == pytest.approx(float(expected), rel=0.02)
    assert first < 0.8 * fresh.state["history"][0]["loss"]
    for key, value in fp16.items():
        torch.testing.assert_close(warm.model.state_dict()[key].half(), value, atol=1e-3, rtol=0)
    # the record survives a resume of the warm-started run
    longer = SegTrainConfig(**{**short.__dict__, "steps": 2})
    resumed = train(longer, cases, [], resume_state=warm.state)
    assert resumed.metrics["initialised_from"] == "model.pt sha256 x"
    with pytest.raises(InputRejected, match="new run"):
        train(longer, cases, [], resume_state=warm.state, initial=InitialWeights(fp16, "x"))
    other = SegTrainConfig(**{**short.__dict__, "net_args": {"channels": [4, 16], "strides": [2]}})
    with pytest.raises(InputRejected, match="do not fit"):
        train(other, cases, [], initial=InitialWeights(fp16, "model.pt"))


def test_worker_init_weights_is_recorded_in_card_and_metrics(tmp_path: Path) -> None:
    _block_dataset(tmp_path, "c", 20, (slice(5, 13),) * 3, 100.0, 5.0, 4)
    common = [
        "train", "segment", "--data", str(tmp_path), "--name", "m", "--patch", "16", "16", "16",
        "--net-args", json.dumps({"channels": [4, 8], "strides": [2], "num_res_units": 0}),
        "--steps", "2", "-q",
    ]  # fmt: skip
    assert run_worker(_args(*common, "--out", str(tmp_path / "a"))) == 0
    weights = tmp_path / "a" / "m" / "model.pt"
    args = _args(*common, "--out", str(tmp_path / "b"), "--init-weights", str(weights))
    assert run_worker(args) == 0
    source = f"model.pt sha256 {file_sha256(weights)}"
    assert json.loads((tmp_path / "b" / "metrics.json").read_text())["initialised_from"] == source
    card = load_card(tmp_path / "b" / "m")
    assert f"initialised from {source}" in card.training_data
    # the card allows test-time mirroring along the flips the training used, and no other
    assert card.mirroring is not None
    assert (card.mirroring.axes, card.mirroring.swap) == ((0, 1, 2), ())
    args = _args(*common, "--out", str(tmp_path / "d"), "--flip-axes", "1", "--mirror-pairs")
    assert run_worker(args) == 0
    assert load_card(tmp_path / "d" / "m").mirroring == Mirroring(axes=(1,))
    assert run_worker(_args(*common, "--out", str(tmp_path / "e"), "--flip-axes")) == 0
    assert load_card(tmp_path / "e" / "m").mirroring is None
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    bad = _args(*common, "--out", str(tmp_path / "c"), "--init-weights", str(tmp_path / "junk.pt"))
    with pytest.raises(InvalidParameters, match=r"junk\.pt: not a weights file"):
        run_worker(bad)
