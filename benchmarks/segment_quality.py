"""Segmentation quality of installed ``segment`` models on the OpenKBP validation patients.

Data: the official OpenKBP *validation* split in ``../shared/data/openkbp`` (33 patients, the
QC-flagged pt_215/pt_216/pt_221 dropped: 30), described by
:func:`workers.openkbp_dataset.build_dataset` exactly as for training; training never saw
them, and they selected the best checkpoint during training (the official test split is not
in the snapshot, so these are validation figures, not test figures).

Each case goes through the real pipeline (:func:`models.pipelines.segment.pipeline.run`: read
with ``service.io.nifti.read_nifti``, reoriented, resampled to the model's spacing, sliding
window, labels back onto the source grid by nearest neighbour) and is scored **on the source
grid** (128³ as released, 3.75–5.4 mm in-plane) against the clinical contours:

* Dice per organ, over the cases in which that organ was contoured (an organ with no voxel in
  the reference was not contoured; those cases are not scored for it);
* HD95 (mm) per organ (:func:`models.pipelines.segment.metrics.hd95`), median and mean over
  the same cases; a case where the model finds nothing counts as ``inf`` (reported apart);
* surface Dice (NSD, :func:`models.pipelines.segment.metrics.surface_dice`) per organ at a
  tolerance of ``--nsd-tolerance`` mm (default 4 mm: about one in-plane voxel of the model grid,
  3.9 mm), which tells "boundary a voxel off" (high NSD, modest Dice) from "organ missed or
  misplaced" (both low);
* mean Dice over the 7 organs (mean of the per-organ means) and seconds per volume.

Targets (issue 6): mean Dice >= 0.80, mandible >= 0.90, UNet++ >= 3D U-Net. Printed with
PASS/FAIL.

Run: ``python benchmarks/segment_quality.py [--models head-neck-oars-unet3d
head-neck-oars-unetpp] [--models-root models/weights/segment] [--cases 30] [--threads 2]
[--largest-component] [--mirroring off|on|both] [--nsd-tolerance MM] [--json PATH]``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DATA = ROOT.parent / "shared" / "data" / "openkbp"
DEFAULT_MODELS = ["head-neck-oars-unet3d", "head-neck-oars-unetpp"]


def evaluate(
    model: str,
    root: Path,
    cases: list[dict[str, Any]],
    largest_component: bool,
    mirroring: bool = False,
    nsd_tolerance_mm: float = 4.0,
) -> dict[str, Any]:
    """Run ``model`` on every case; per-organ Dice, HD95 and surface Dice on the source grid."""
    from models.pipelines.segment.metrics import dice, hd95, surface_dice
    from models.pipelines.segment.params import SegmentParams
    from models.pipelines.segment.pipeline import run
    from models.result import no_progress
    from service.io.nifti import read_nifti

    params = SegmentParams.model_validate(
        {
            "model": model,
            "device": "cpu",
            "largest_component": largest_component,
            "mirroring": mirroring,
        },
        context={"models_root": root},
    )
    per: dict[str, dict[str, list[float]]] = {}
    seconds = []
    names: dict[int, str] = {}
    for case in cases:
        image = read_nifti(Path(case["image"]))
        truth = read_nifti(Path(case["label"])).array.astype(np.int64)
        t0 = time.perf_counter()
        result = run({"image": image}, params, no_progress, models_root=root)
        seconds.append(time.perf_counter() - t0)
        seg = result.label_maps["segmentation"]
        names = {info.value: info.name for info in seg.labels}
        spacing = np.linalg.norm(image.affine[:3, :3], axis=0)
        for value in case["present"]:
            pred, ref = seg.array == value, truth == value
            row = per.setdefault(names[value], {"dice": [], "hd95": [], "nsd": []})
            row["dice"].append(dice(pred, ref))
            row["hd95"].append(hd95(pred, ref, spacing))
            row["nsd"].append(surface_dice(pred, ref, spacing, nsd_tolerance_mm))
    organs = {}
    for name in (names[v] for v in sorted(names)):
        row = per.get(name, {"dice": [], "hd95": [], "nsd": []})
        finite = [h for h in row["hd95"] if math.isfinite(h)]
        organs[name] = {
            "cases": len(row["dice"]),
            "dice_mean": float(np.mean(row["dice"])) if row["dice"] else float("nan"),
            "dice_median": float(np.median(row["dice"])) if row["dice"] else float("nan"),
            "nsd_mean": float(np.mean(row["nsd"])) if row["nsd"] else float("nan"),
            "hd95_median_mm": float(np.median(finite)) if finite else float("nan"),
            "hd95_mean_mm": float(np.mean(finite)) if finite else float("nan"),
            "missed": len(row["hd95"]) - len(finite),
        }
    scored = [o for o in organs.values() if o["cases"]]
    return {
        "model": model + (" +mirroring" if mirroring else ""),
        "cases": len(cases),
        "organs": organs,
        "mean_dice": float(np.mean([o["dice_mean"] for o in scored])) if scored else float("nan"),
        "mean_nsd": float(np.mean([o["nsd_mean"] for o in scored])) if scored else float("nan"),
        "nsd_tolerance_mm": nsd_tolerance_mm,
        "seconds_per_volume": float(np.median(seconds)) if seconds else float("nan"),
    }


def _table(results: list[dict[str, Any]]) -> str:
    organs = list(results[0]["organs"])
    head = "| organ (cases) | " + " | ".join(
        f"{r['model']} Dice | NSD@{r['nsd_tolerance_mm']:g}mm | HD95 median (mm)" for r in results
    )
    lines = [head + " |", "|" + "---|" * (1 + 3 * len(results))]
    for organ in organs:
        cells = [f"{organ} ({results[0]['organs'][organ]['cases']})"]
        for r in results:
            o = r["organs"][organ]
            missed = f", {o['missed']} missed" if o["missed"] else ""
            cells += [
                f"{o['dice_mean']:.3f}",
                f"{o['nsd_mean']:.3f}",
                f"{o['hd95_median_mm']:.1f}{missed}",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append(
        "| **mean** | "
        + " | ".join(
            f"**{r['mean_dice']:.3f}** | {r['mean_nsd']:.3f} | {r['seconds_per_volume']:.1f} s/vol"
            for r in results
        )
        + " |"
    )
    return "\n".join(lines)


def _targets(results: list[dict[str, Any]]) -> list[str]:
    out = []
    for r in results:
        mandible = r["organs"].get("Mandible", {}).get("dice_mean", float("nan"))
        out.append(
            f"{r['model']}: mean Dice {r['mean_dice']:.3f} >= 0.80: "
            f"{'PASS' if r['mean_dice'] >= 0.80 else 'FAIL'}; mandible {mandible:.3f} >= 0.90: "
            f"{'PASS' if mandible >= 0.90 else 'FAIL'}"
        )
    by = {r["model"]: r["mean_dice"] for r in results}
    plain = {k: v for k, v in by.items() if "+" not in k}
    unet = next((v for k, v in plain.items() if "unet3d" in k), None)
    unetpp = next((v for k, v in plain.items() if "unetpp" in k), None)
    if unet is not None and unetpp is not None:
        out.append(
            f"UNet++ {unetpp:.3f} >= 3D U-Net {unet:.3f}: {'PASS' if unetpp >= unet else 'FAIL'}"
        )
    return out


def main(argv: list[str] | None = None) -> int:
    """Evaluate, print the table and the targets, optionally write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS)
    parser.add_argument("--models-root", default=str(ROOT / "models" / "weights" / "segment"))
    parser.add_argument("--data", default=str(DATA), help="OpenKBP folder")
    parser.add_argument("--cases", type=int, default=0, help="first K validation cases (0 all)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--largest-component", action="store_true")
    parser.add_argument(
        "--mirroring",
        default="off",
        choices=["off", "on", "both"],
        help="test-time mirroring (both: every model without and with, side by side)",
    )
    parser.add_argument(
        "--nsd-tolerance", type=float, default=4.0, help="surface Dice tolerance, mm"
    )
    parser.add_argument("--json", default="", help="write the figures here")
    args = parser.parse_args(argv)

    import torch

    from workers.openkbp_dataset import build_dataset

    torch.set_num_threads(args.threads)
    cases = build_dataset(Path(args.data))["validation"]
    if args.cases:
        cases = cases[: args.cases]
    root = Path(args.models_root)
    flags = {"off": [False], "on": [True], "both": [False, True]}[args.mirroring]
    results = [
        evaluate(m, root, cases, args.largest_component, mirror, args.nsd_tolerance)
        for m in args.models
        for mirror in flags
    ]
    print(
        f"OpenKBP validation, {len(cases)} patients (QC-flagged dropped), scored on the source "
        f"grid; postprocessing: {'largest component' if args.largest_component else 'none'}; "
        f"{args.threads} torch threads\n"
    )
    print(_table(results))
    print()
    print("\n".join(_targets(results)))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
