"""Sparse-view training: openkbp split, real-CT slices, simulation, batches, 3-step run, resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
nib = pytest.importorskip("nibabel")

from models.training.sparse_view_data import (  # noqa: E402
    CTCase,
    SimulationConfig,
    SparseViewSimulator,
    axial_slices,
    body_psnr,
    make_batch,
    make_validation_set,
    openkbp_split,
)
from models.training.sparse_view_train import (  # noqa: E402
    TrainConfig,
    batch_loss,
    build_model,
    train,
)

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
KBP = DATA / "openkbp"

pytestmark = pytest.mark.skipif(not (KBP / "splits.json").exists(), reason="no openkbp data")


def _splits() -> dict:
    return json.loads((KBP / "splits.json").read_text())


def _case(name: str, size: int = 32, stride: int = 16) -> CTCase:
    img = nib.load(KBP / name / "ct.nii.gz")
    # openkbp arrays are [P, L, I]: reorder to [L, P, S] as the CLI loader does
    vol = np.asarray(img.dataobj, dtype=np.float32).transpose(1, 0, 2)[:, :, ::-1]
    slices, pixel = axial_slices(vol, float(img.header.get_zooms()[0]), size, stride)
    return CTCase(f"openkbp/{name}", slices, pixel)


def test_openkbp_split_is_patient_level_and_drops_flagged() -> None:
    train_ids, val_ids = openkbp_split(_splits())
    assert not set(train_ids) & set(val_ids)
    assert "train-pats/pt_89" not in train_ids
    assert "validation-pats/pt_215" not in val_ids
    assert len(train_ids) == 169
    assert len(val_ids) == 30
    all_train, _ = openkbp_split(_splits(), exclude_flagged=False)
    assert len(all_train) == 170


def test_axial_slices_of_a_real_case() -> None:
    case = _case("train-pats/pt_1", size=64, stride=8)
    assert case.slices_hu.shape[1:] == (64, 64)
    assert case.slices_hu.shape[0] >= 4
    assert case.pixel_size_mm == pytest.approx(3.906 * 2, rel=1e-3)
    assert float(case.slices_hu.min()) >= -1024.0
    assert float(case.slices_hu.max()) > 200.0


def test_more_views_give_better_fbp_on_real_ct() -> None:
    case = _case("validation-pats/pt_201", size=64, stride=32)
    sim = SparseViewSimulator(SimulationConfig(views=(18, 60)))
    val = make_validation_set([case], sim, slices_per_case=1)
    p18 = body_psnr(val.inputs_hu[18][0], val.target_hu[0])
    p60 = body_psnr(val.inputs_hu[60][0], val.target_hu[0])
    assert p60 > p18 + 2.0


def test_batches_are_a_function_of_seed_and_step() -> None:
    cases = [_case("train-pats/pt_1"), _case("train-pats/pt_2")]
    sim = SparseViewSimulator()
    a = make_batch(cases, sim, seed=3, step=7, batch_size=2, crop=24)
    b = make_batch(cases, sim, seed=3, step=7, batch_size=2, crop=24)
    c = make_batch(cases, sim, seed=3, step=8, batch_size=2, crop=24)
    assert np.array_equal(a.student_hu, b.student_hu)
    assert a.views == b.views
    assert a.student_hu.shape == a.teacher_hu.shape == a.target_hu.shape == (2, 24, 24)
    assert not np.array_equal(a.student_hu, c.student_hu)
    # the teacher (2x views) is closer to the target than the student
    assert np.abs(a.teacher_hu - a.target_hu).mean() < np.abs(a.student_hu - a.target_hu).mean()


def test_three_steps_reduce_the_loss_and_resume_continues(tmp_path: Path) -> None:
    cases = [_case("train-pats/pt_1"), _case("train-pats/pt_2")]
    config = TrainConfig(
        steps=3, batch_size=2, crop=32, lr=2e-3, checkpoint_every=2, features=8, ffc_blocks=1
    )
    batch = make_batch(cases, SparseViewSimulator(), seed=0, step=0, batch_size=2, crop=32)
    before, _ = batch_loss(build_model(config), batch, config)
    saved: list[dict] = []
    outcome = train(config, cases, None, save_checkpoint=lambda s: saved.append(s))
    after, _ = batch_loss(outcome.model, batch, config)
    assert float(after.detach()) < float(before.detach())
    assert [s["step"] for s in saved] == [2, 3]
    resumed = train(
        TrainConfig(**{**config.__dict__, "steps": 5}), cases, None, resume_state=saved[0]
    )
    assert resumed.metrics["resumed_from_step"] == 2
    assert resumed.metrics["steps_this_run"] == 3
    assert [h["step"] for h in resumed.state["history"]] == [1, 2, 3, 4, 5]
    # the resumed run repeats step 3 exactly as the uninterrupted run did
    assert resumed.state["history"][2]["loss"] == pytest.approx(saved[1]["history"][2]["loss"])


def test_cli_train_writes_weights_and_resumes(tmp_path: Path) -> None:
    from service.cli import main

    out = tmp_path / "run"
    common = [
        "train", "sparse-view-ct", "--out", str(out), "--train-cases", "1", "--val-cases", "1",
        "--val-slices", "1", "--image-size", "32", "--crop", "32", "--batch-size", "2",
        "--slice-stride", "16", "--features", "8", "--checkpoint-every", "1", "--no-extra",
        "--data", str(DATA), "-q",
    ]  # fmt: skip
    assert main([*common, "--steps", "2"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    digest = (out / "gloredi_sparse_view_fp16.pt.sha256").read_text().split()[0]
    assert metrics["weights_sha256"] == digest
    assert metrics["steps_total"] == 2
    assert set(metrics["validation"]) == {"18", "36", "60"}
    assert metrics["data"]["validation_cases"] == ["openkbp/validation-pats/pt_201"]
    weights = torch.load(out / "gloredi_sparse_view_fp16.pt")
    assert all(v.dtype == torch.float16 for v in weights.values())
    assert main([*common, "--steps", "3"]) == 2  # checkpoint exists: --resume needed
    other_data = [*common, "--steps", "3", "--resume", "--val-slices", "2"]
    assert main(other_data) == 2  # resuming on other data is refused
    assert main([*common, "--steps", "3", "--resume"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["resumed_from_step"] == 2
    assert metrics["steps_total"] == 3


def test_cli_module_does_not_import_torch() -> None:
    import subprocess
    import sys

    code = "import sys, service.cli; print('torch' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=str(Path(__file__).resolve().parents[2]),
    )
    assert out.stdout.strip() == "False"
