"""CBCT -> synthetic CT on held-out real CT: identity, hu-calibration, plain UNet, 3D UNet, GLFC.

Data: OpenKBP *validation* patients (``../shared/data/openkbp``, QC-flagged ones left out, as
:func:`workers.openkbp_dataset.build_dataset` lists them) after the first
:data:`SELECTION_CASES`, which selected the best training state (``voxelgate train cbct-to-sct
--val-cases 8``): the remaining patients were never seen in training or selection. Each CBCT
is simulated from the patient's real CT exactly as the training pairs were
(:func:`workers.cbct_pairs.simulate_pair`: 180 projections, ``random_artefacts(7000000 +
patient number)`` without misregistration, some cases truncated) and cached in ``--pairs``
(the folder of ``voxelgate dataset cbct-pairs``; missing pairs are simulated).

Each method goes through the real pipeline (:func:`models.pipelines.cbct_to_sct.pipeline.run`
with the planning CT as ``reference``) and is scored by it: MAE (HU), PSNR (dB, range 4024 HU)
and SSIM (SynthRAD2023 definitions, :mod:`models.pipelines.cbct_to_sct.metrics`) inside the
reference body within the CBCT field of view; seconds per volume (pipeline runtime, CPU,
``--threads`` torch threads).

Baseline: ``identity`` (the raw simulated CBCT). Targets (issue 7): GLFC MAE at least 50 %
below identity, SSIM >= 0.92, and better than the plain UNet of about the same size (MAE and
SSIM). Printed with PASS/FAIL, with the number of patients on which GLFC has the lower MAE.
The 3D UNet (``network=unet3d``: the plain UNet in 3D, same size, trained on 16-slice patches
for the same number of steps) answers issue 7's "2.5D or 3D: measure and choose" on quality;
``benchmarks/sct_dims.py`` measures the cost side.

Run: ``python benchmarks/sct.py [--pairs DIR] [--cases N] [--threads 2] [--json PATH]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DATA = ROOT.parent / "shared" / "data" / "openkbp"
SELECTION_CASES = 8
"""Validation patients used for model selection during training (skipped here)."""

METHODS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("identity", {"method": "identity"}),
    ("hu-calibration", {"method": "hu-calibration"}),
    ("unet (plain)", {"method": "learned", "network": "unet"}),
    ("unet3d (3D)", {"method": "learned", "network": "unet3d"}),
    ("glfc (ours)", {"method": "learned", "network": "glfc"}),
)


def held_out_cases(limit: int) -> list[dict[str, Any]]:
    """The validation patients after the selection ones (at most ``limit``; 0: all)."""
    from workers.openkbp_dataset import build_dataset

    cases = build_dataset(DATA)["validation"][SELECTION_CASES:]
    return cases[:limit] if limit else cases


def pair(case: dict[str, Any], pairs: Path) -> dict[str, Any]:
    """The cached simulated pair of ``case`` (simulated now when missing)."""
    from workers.cbct_pairs import DEFAULT_PROJECTIONS, simulate_pair

    return simulate_pair(
        {
            "case": case["case"],
            "ct": case["image"],
            "folder": str(pairs / "validation-pats" / case["case"]),
            "projections": DEFAULT_PROJECTIONS,
            "threads": 1,
            "sad_mm": 1000.0,
            "sdd_mm": 1500.0,
        }
    )


def evaluate(entry: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every method on one pair: metrics of the sCT and seconds."""
    import dataclasses

    from models.pipelines.cbct_to_sct.params import CBCTToSCTParams
    from models.pipelines.cbct_to_sct.pipeline import run
    from models.result import no_progress
    from service.io.nifti import read_nifti

    frame = "1.2.826.0.1.3680043.8.498.7002"  # NIfTI has none: the pair shares one frame
    ct = dataclasses.replace(
        read_nifti(Path(entry["ct"])), modality="CT", units="HU", frame_of_reference_uid=frame
    )
    cbct = dataclasses.replace(
        read_nifti(Path(entry["cbct"])), modality="CT", units="HU", frame_of_reference_uid=frame
    )
    out: dict[str, dict[str, Any]] = {}
    for name, raw in METHODS:
        params = CBCTToSCTParams.model_validate({**raw, "device": "cpu"})
        clock = time.perf_counter()
        result = run({"image": cbct, "reference": ct}, params, no_progress)
        seconds = time.perf_counter() - clock
        metrics = result.measurements["metrics"]
        out[name] = {
            **{k: metrics["sct"][k] for k in ("mae_hu", "psnr_db", "ssim")},
            "seconds": round(seconds, 2),
            "truncated": bool(result.measurements["field_of_view"].get("truncated", False)),
        }
    return out


def _mean_sd(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.3f}" if values else "-"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def summarise(per_case: dict[str, dict[str, dict[str, Any]]]) -> dict[str, dict[str, float]]:
    """Mean of each metric per method."""
    summary: dict[str, dict[str, float]] = {}
    for name, _ in METHODS:
        rows = [c[name] for c in per_case.values()]
        summary[name] = {
            k: round(statistics.mean(r[k] for r in rows), 4)
            for k in ("mae_hu", "psnr_db", "ssim", "seconds")
        }
    return summary


def print_table(per_case: dict[str, dict[str, dict[str, Any]]], threads: int) -> dict[str, Any]:
    """Print the table and the target checks; return the summary with the checks."""
    summary = summarise(per_case)
    base = summary["identity"]["mae_hu"]
    print(
        f"\nCBCT -> sCT on {len(per_case)} held-out OpenKBP patients (simulated CBCT from their "
        f"real CT; body within the CBCT FOV; CPU, {threads} thread(s)); mean ± sd over patients"
    )
    print(
        f"{'method':<16} {'MAE (HU)':>18} {'vs raw':>8} {'PSNR (dB)':>18} {'SSIM':>16} {'s/vol':>7}"
    )
    for name, _ in METHODS:
        rows = [c[name] for c in per_case.values()]
        s = summary[name]
        change = 100.0 * (1.0 - s["mae_hu"] / base) if base else 0.0
        mae, psnr = _mean_sd([r["mae_hu"] for r in rows]), _mean_sd([r["psnr_db"] for r in rows])
        ssim = _mean_sd([r["ssim"] for r in rows])
        print(f"{name:<16} {mae:>18} {change:>7.1f}% {psnr:>18} {ssim:>16} {s['seconds']:>7.2f}")
    ours, plain, cube = summary["glfc (ours)"], summary["unet (plain)"], summary["unet3d (3D)"]
    wins = sum(c["glfc (ours)"]["mae_hu"] < c["unet (plain)"]["mae_hu"] for c in per_case.values())
    print(f"  glfc has a lower MAE than the plain UNet on {wins} of {len(per_case)} patients")
    better = "2.5D" if plain["mae_hu"] < cube["mae_hu"] else "3D"
    print(
        f"  2.5D plain UNet {plain['mae_hu']:.1f} HU / SSIM {plain['ssim']:.3f} vs 3D UNet "
        f"{cube['mae_hu']:.1f} HU / SSIM {cube['ssim']:.3f}: {better} has the lower MAE"
    )
    checks = {
        "glfc MAE >= 50% below raw CBCT": ours["mae_hu"] <= 0.5 * base,
        "glfc SSIM >= 0.92": ours["ssim"] >= 0.92,
        "glfc better than plain UNet (MAE and SSIM)": ours["mae_hu"] < plain["mae_hu"]
        and ours["ssim"] > plain["ssim"],
    }
    for text, ok in checks.items():
        print(f"  {'PASS' if ok else 'FAIL'}  {text}")
    return {"summary": summary, "checks": checks}


def main() -> int:
    """Run the benchmark."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", default=str(ROOT.parent / "sct_pairs"), help="pair cache")
    parser.add_argument("--cases", type=int, default=0, help="held-out patients (0: all)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="write per-case figures and the summary here")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    per_case: dict[str, dict[str, dict[str, Any]]] = {}
    for case in held_out_cases(args.cases):
        entry = pair(case, Path(args.pairs))
        per_case[case["case"]] = evaluate(entry)
        row = per_case[case["case"]]
        print(
            f"{case['case']}: raw {row['identity']['mae_hu']:.1f} HU, "
            f"glfc {row['glfc (ours)']['mae_hu']:.1f} HU",
            flush=True,
        )
    report = print_table(per_case, args.threads)
    if args.json:
        Path(args.json).write_text(json.dumps({**report, "cases": per_case}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
