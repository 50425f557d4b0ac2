"""Segmentation benchmarks: speed (ours vs MONAI's defaults) and peak memory, on CPU.

Two parts in one run (``--parts speed,memory``, default both, in that order). The memory part is
``benchmarks/segment_memory.py`` (described there; its flags ``--memory-shape``,
``--memory-methods`` and ``--skip-baseline-memory`` are accepted here too); this script is the
speed part.

Speed: a 256 x 256 x 128 volume (``--shape``) with a 96³ window. The volume is a real CT,
OpenKBP validation case ``--case`` (``/work/shared/data/openkbp/validation-pats/<case>/ct.nii.gz``,
128³ head-and-neck planning CT), resampled trilinearly (HU; -1024 outside its field of view)
onto a grid of ``--shape`` voxels in the card's frame centred on the CT. The model is
``--model`` from ``--models-root`` (default ``head-neck-oars-unet3d`` when it is installed in
``models/weights/segment``); without an installed model, a MONAI UNet with channels
(16, 32, 64, 128, 256), strides (2, 2, 2, 2), 2 residual units and random weights (seed 0, the
7 OpenKBP organs + background), at the spacing that makes the grid cover exactly the CT's
field of view. A random network's labels mean nothing, so Dice is then not reported.

* baseline: the pre-processing of the pipeline (reorient, window, resample: identity here),
  then MONAI ``sliding_window_inference`` with fp32, overlap 0.5, sw_batch 4 and MONAI's
  default blending ``mode="constant"`` (padding constant 0), argmax, and labels back.
* ours: the pipeline's ``segment_volume`` with our defaults (:class:`SegmentParams`: bf16
  autocast, Gaussian blending, streamed logits, body crop for CT, overlap and sw_batch as
  there), plus two ablation rows (fp32 streamed without crop; bf16 without crop) unless
  ``--no-ablation``.

Seconds are wall time, median of ``--repeats`` runs (after one untimed warm-up run of each
method at the first repeat's cost), everything from the source Volume to the label array.
Throughput = baseline seconds / seconds. Dice: per label, between our label map and the
baseline's (agreement), and, for a trained OpenKBP model, of each against the case's clinical
contours (labels matched by name; a label absent from the case is skipped).

``--threads`` torch threads (default 2) everywhere. The load average is printed: on the
shared 2-core machine other processes slow every figure.

Run: ``python benchmarks/segment.py [--parts speed,memory] [--model NAME] [--models-root DIR]
[--case pt_201] [--shape 256 256 128] [--repeats 3] [--no-ablation] [--threads 2]
[--memory-shape 512 512 800] [--memory-methods ours,ours-nocrop,monai]
[--skip-baseline-memory]``; the memory part alone: ``python benchmarks/segment_memory.py``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import segment_memory
from benchmarks.segment_common import BASELINE, THREADS, install_random_model, monai_baseline
from models.pipelines.segment.card import (
    AXIS_CODES,
    MODELS_ROOT,
    ModelCard,
    installed_models,
    resolve_model,
)
from models.pipelines.segment.geometry import reorientation
from models.pipelines.segment.networks import FinalOutput, load_network
from models.pipelines.segment.params import SegmentParams
from models.pipelines.segment.pipeline import segment_volume
from models.result import no_progress
from models.volume import Volume

PARTS = ("speed", "memory")
OPENKBP = Path(__file__).resolve().parents[2] / "shared" / "data" / "openkbp" / "validation-pats"
OPENKBP_LABELS = (
    "Brainstem",
    "SpinalCord",
    "RightParotid",
    "LeftParotid",
    "Esophagus",
    "Larynx",
    "Mandible",
)
"""OpenKBP ``oars.nii.gz`` values 1..7."""
SHIPPED = "head-neck-oars-unet3d"
SPEED_NET = {"channels": [16, 32, 64, 128, 256], "strides": [2, 2, 2, 2], "num_res_units": 2}


# ----------------------------------------------------------------------------- volumes


def grid_volume(
    shape: tuple[int, int, int], spacing: tuple[float, float, float], orientation: str
) -> Volume:
    """An empty grid in the card's frame: array axes = canonical axes (no reorientation)."""
    affine = np.eye(4)
    for t, code in enumerate(orientation):
        world, sign = AXIS_CODES[code]
        affine[:3, t] = 0.0
        affine[world, t] = sign * spacing[t]
    return Volume(np.zeros(shape, np.float32), affine, modality="CT", units="HU")


def resample_onto(source: Volume, grid: Volume, order: int, cval: float) -> np.ndarray:
    """``source`` sampled at ``grid``'s voxel centres (scipy ``map_coordinates``)."""
    from scipy import ndimage

    index = np.indices(grid.shape, dtype=np.float32).reshape(3, -1)
    world = grid.affine[:3, :3] @ index + grid.affine[:3, 3:4]
    src = np.linalg.inv(source.affine)
    coords = src[:3, :3] @ world + src[:3, 3:4]
    values = ndimage.map_coordinates(
        source.array.astype(np.float32), coords, order=order, cval=cval, mode="constant"
    )
    return values.reshape(grid.shape)


def benchmark_case(
    case: str, shape: tuple[int, int, int], card: ModelCard | None
) -> tuple[Volume, np.ndarray | None, tuple[float, float, float]]:
    """The real CT of ``case`` on a ``shape`` grid (card spacing, or the CT's field of view).

    Returns:
        ``(image, truth, spacing)``: the CT in HU on the grid, the clinical OAR labels on the
        same grid (nearest neighbour) or ``None``, and the grid spacing (mm, canonical axes).
    """
    from service.io.nifti import read_nifti

    folder = OPENKBP / case
    ct = read_nifti(folder / "ct.nii.gz")
    orientation = card.orientation if card is not None else "RAS"
    reo = reorientation(ct.affine, orientation)
    canon_shape = reo.apply(ct.array).shape
    canon_affine = reo.affine(ct.affine, ct.shape)
    canon_spacing = np.linalg.norm(canon_affine[:3, :3], axis=0)
    if card is not None:
        spacing = card.spacing_mm
    else:  # the same field of view as the CT
        s = canon_spacing * np.array(canon_shape) / np.array(shape)
        spacing = (float(s[0]), float(s[1]), float(s[2]))
    grid = grid_volume(shape, spacing, orientation)
    centre_ct = ct.index_to_lps((np.array(ct.shape) - 1) / 2.0)
    centre_grid = grid.index_to_lps((np.array(shape) - 1) / 2.0)
    affine = grid.affine.copy()
    affine[:3, 3] += centre_ct - centre_grid
    grid = Volume(grid.array, affine, modality="CT", units="HU")
    image = grid.with_array(resample_onto(ct, grid, 1, -1024.0))
    truth = None
    if (folder / "oars.nii.gz").is_file():
        oars = read_nifti(folder / "oars.nii.gz")
        truth = resample_onto(oars, grid, 0, 0.0).astype(np.uint8)
    return image, truth, spacing


# ----------------------------------------------------------------------------- methods


def ours(
    image: Volume, card: ModelCard, network: FinalOutput, **changes: Any
) -> tuple[np.ndarray, dict[str, object]]:
    """``segment_volume`` with our defaults (``changes`` override them)."""
    params = SegmentParams(**changes)
    label_map, facts = segment_volume(image, card, network, params, no_progress)
    return label_map.array, facts


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two masks; NaN when both are empty."""
    total = int(a.sum()) + int(b.sum())
    return float("nan") if total == 0 else 2.0 * float(np.logical_and(a, b).sum()) / total


def timed(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """Median wall time of ``repeats`` runs and the last result."""
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def _fmt(value: float) -> str:
    return "-" if value != value else f"{value:.4f}"  # NaN -> "-"


# ----------------------------------------------------------------------------- speed


def speed(args: argparse.Namespace) -> None:
    """The speed part: baseline vs ours (and ablations) on the real CT case."""
    torch.set_num_threads(args.threads)
    root = Path(args.models_root)
    name = args.model or (SHIPPED if SHIPPED in installed_models(root) else None)
    print("## Segmentation speed (CPU)")
    with tempfile.TemporaryDirectory() as tmp:
        trained = name is not None
        if name is not None:
            card, network = load_network(root / resolve_model(name, root), "cpu")
            image, truth, spacing = benchmark_case(args.case, tuple(args.shape), card)
        else:
            image, truth, spacing = benchmark_case(args.case, tuple(args.shape), None)
            name = "random-unet-16-256"
            install_random_model(Path(tmp), name, OPENKBP_LABELS, SPEED_NET, spacing)
            card, network = load_network(Path(tmp) / name, "cpu")
        defaults = SegmentParams()
        print(
            f"volume: OpenKBP {args.case} CT resampled to {list(image.shape)} voxels at "
            f"{[round(s, 3) for s in spacing]} mm ({card.orientation}); window "
            f"{list(card.patch_size)}; model {name} ({card.n_classes} classes)"
        )
        if not trained:
            print(
                "NO TRAINED MODEL installed (models/weights/segment/"
                f"{SHIPPED} or --model): random weights, so Dice is not reported; speed only."
            )
        print(
            f"ours = segment_volume defaults: bf16={defaults.bf16}, overlap={defaults.overlap}, "
            f"sw_batch={defaults.sw_batch}, gaussian, streamed, crop_body={defaults.crop_body}"
        )
        print(f"{args.threads} torch threads; load average at start: {os.getloadavg()}")
        methods: list[tuple[str, Callable[[], Any]]] = [
            (f"baseline: {BASELINE}", lambda: monai_baseline(image, card, network)),
        ]
        if not args.no_ablation:
            methods += [
                (
                    "ours fp32, no crop",
                    lambda: ours(image, card, network, bf16=False, crop_body=False)[0],
                ),
                ("ours bf16, no crop", lambda: ours(image, card, network, crop_body=False)[0]),
            ]
        methods.append(("ours (defaults: bf16, crop)", lambda: ours(image, card, network)[0]))
        for _, fn in methods:  # warm-up (oneDNN kernels, allocator)
            fn()
        rows = []
        print()
        print(
            f"| method | seconds (median of {args.repeats}) | throughput vs baseline | "
            "mean Dice vs baseline | min Dice vs baseline |"
        )
        print("|---|---:|---:|---:|---:|")
        base_t = 0.0
        base_labels: np.ndarray | None = None
        for label, fn in methods:
            t, labels = timed(fn, args.repeats)
            if base_labels is None:
                base_t, base_labels = t, labels
            per = [dice(labels == v, base_labels == v) for v in range(1, card.n_classes)]
            valid = [d for d in per if d == d]
            mean = float(np.mean(valid)) if valid and trained else float("nan")
            low = float(np.min(valid)) if valid and trained else float("nan")
            rows.append((label, t, labels, per))
            print(f"| {label} | {t:.2f} | {base_t / t:.2f}x | {_fmt(mean)} | {_fmt(low)} |")
            sys.stdout.flush()
        assert base_labels is not None  # the baseline is the first method
        _, facts = ours(image, card, network)
        print(f"\nbody crop: {facts['body_crop']}")
        if trained:
            ours_labels = rows[-1][2]
            print(
                "\n| label | Dice ours vs baseline | Dice baseline vs truth | Dice ours vs truth "
                "| change |"
            )
            print("|---|---:|---:|---:|---:|")
            names = {lab.value: lab.name for lab in card.labels}
            truth_value = {_key(n): v + 1 for v, n in enumerate(OPENKBP_LABELS)}
            for v in range(1, card.n_classes):
                agree = dice(ours_labels == v, base_labels == v)
                tv = truth_value.get(_key(names[v]))
                if truth is not None and tv is not None and (truth == tv).any():
                    db, do = (
                        dice(base_labels == v, truth == tv),
                        dice(ours_labels == v, truth == tv),
                    )
                    cells = f"{_fmt(db)} | {_fmt(do)} | {do - db:+.4f}"
                else:
                    cells = "- | - | -"
                print(f"| {names[v]} | {_fmt(agree)} | {cells} |")
        print(f"load average at end: {os.getloadavg()}")


def _key(name: str) -> str:
    return "".join(c for c in name.lower() if c.isalnum())


# ----------------------------------------------------------------------------- main


def parse_parts(text: str) -> list[str]:
    """``"speed,memory"`` -> the parts in their fixed order; unknown names are an error."""
    asked = {p.strip() for p in text.split(",") if p.strip()}
    unknown = asked - set(PARTS)
    if unknown or not asked:
        raise argparse.ArgumentTypeError(
            f"--parts takes a comma-separated subset of {','.join(PARTS)}, got {text!r}"
        )
    return [p for p in PARTS if p in asked]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", type=parse_parts, default=list(PARTS))
    parser.add_argument(
        "--model", default=None, help=f"installed model (default {SHIPPED} if installed)"
    )
    parser.add_argument("--models-root", default=str(MODELS_ROOT))
    parser.add_argument("--case", default="pt_201", help="OpenKBP validation case")
    parser.add_argument("--shape", type=int, nargs=3, default=[256, 256, 128])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-ablation", action="store_true")
    parser.add_argument("--threads", type=int, default=THREADS, help="torch threads")
    segment_memory.add_arguments(parser)
    args = parser.parse_args(argv)
    runners = {"speed": speed, "memory": segment_memory.memory}
    for index, part in enumerate(args.parts):
        if index:
            print(flush=True)
        runners[part](args)
        sys.stdout.flush()


if __name__ == "__main__":
    main()
