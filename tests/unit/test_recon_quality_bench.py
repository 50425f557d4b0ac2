"""The quality part of benchmarks/recon.py on one real held-out slice at 18 views."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from benchmarks import recon, recon_quality
from models.networks.gloredi import GloReDiNet
from models.pipelines.sparse_view_ct.learned import ARCHITECTURE

SPLITS = recon_quality.DATA / "openkbp" / "splits.json"
pytestmark = pytest.mark.skipif(not SPLITS.exists(), reason=f"no OpenKBP data at {SPLITS}")

SMALL = [
    "--patients", "1", "--slices", "1", "--views", "18",
    "--sirt-iterations", "5", "--cgls-iterations", "5", "--tv-iterations", "30",
    "--tv-weak-iterations", "30", "--dc-iterations", "30",
]  # fmt: skip


def test_quality_part_wiring_and_physics(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    weights = tmp_path / "fresh_fp16.pt"
    torch.manual_seed(0)
    torch.save(GloReDiNet(**ARCHITECTURE).half().state_dict(), weights)
    out = tmp_path / "quality.json"
    figures = recon_quality.main([*SMALL, "--learned-weights", str(weights), "--json", str(out)])

    assert figures["complete"] is True
    assert [d["case"] for d in figures["data"]] == ["openkbp/validation-pats/pt_201"]
    summary = figures["summary"]
    assert set(summary) == {"FBP", "SIRT", "CGLS", "TV", "TV weak", "network", "learned"}
    assert set(summary["FBP"]) == {"18", "720"}
    fbp, tv = summary["FBP"]["18"]["psnr_db"], summary["TV"]["18"]["psnr_db"]
    # a freshly initialised network returns its input (zero head): network == FBP
    assert summary["network"]["18"]["psnr_db"] == pytest.approx(fbp, abs=0.01)
    # learned = network + its data-consistency step: TV from the (FBP) start beats FBP
    assert summary["learned"]["18"]["psnr_db"] > fbp + 1.0
    assert tv > fbp  # TV regularisation beats FBP at 18 views (real physics)
    assert summary["TV weak"]["18"]["psnr_db"] > fbp
    assert summary["FBP"]["720"]["psnr_db"] > fbp + 3.0
    assert all(0.0 < summary[m]["18"]["ssim"] <= 1.0 for m in ("FBP", "TV", "network", "learned"))

    targets = {t["target"]: t for t in figures["targets"]}
    assert targets["learned >= FBP + 8 dB at 18 views"]["passed"] is False  # gain ~0
    assert targets["learned >= FBP + 8 dB at 60 views"]["passed"] is None  # 60 not run
    assert json.loads(out.read_text())["summary"] == summary

    text = capsys.readouterr().out
    assert "HU window [-1000, 1000]" in text
    assert "body mask" in text
    assert "| FBP, 720 views (reference) |" in text
    assert "FAIL: learned" in text


def test_quality_part_without_weights(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(recon_quality, "registered_weights", lambda: None)
    args = [
        *SMALL, "--sirt-iterations", "0", "--cgls-iterations", "0", "--tv-iterations", "0",
        "--tv-weak-iterations", "0",
    ]  # fmt: skip
    figures = recon_quality.main(args)
    assert set(figures["summary"]) == {"FBP"}
    assert all(t["passed"] is None for t in figures["targets"])
    assert "learned: no weights" in capsys.readouterr().out


def test_recon_parts() -> None:
    assert recon.parse_parts("flicking,speed") == ["speed", "flicking"]
    assert recon.parse_parts("quality") == ["quality"]
    with pytest.raises(argparse.ArgumentTypeError, match="subset"):
        recon.parse_parts("speed,bogus")
