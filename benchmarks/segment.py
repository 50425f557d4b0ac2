"""Segmentation benchmarks: speed (ours vs MONAI's defaults) and peak memory, on CPU.

Two parts in one run (``--parts speed,memory``, default both, in that order).

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

Memory: a synthetic CT (HU) of ``--memory-shape`` columns x rows x slices (default 512 x 512 x
800, 0.8 x 0.8 x 1.0 mm, LPS, feet first along k): an elliptic body cylinder (soft tissue 40 HU,
two lungs -800 HU, a spine 700 HU, noise sigma 20 HU) above a 20 mm couch, air -1000 HU
elsewhere. Model: a 10-label MONAI UNet with random weights (channels 4, 8, 16), a 96³ window,
card spacing equal to the volume's (so the network grid is the full 512 x 512 x 800: the worst
case), installed into a temporary models root. Each method (``--memory-methods``, default all) runs
in its own subprocess (its ``oom_score_adj`` raised so that the kernel would kill it before
anything else), which reports its peak RSS (``VmHWM``), the RSS once the input volume exists,
and its wall time:

* ``ours``: the pipeline ``run`` with our defaults (model load with sha256, everything
  ``segment_volume`` does, the overlay figure and label volumes);
* ``ours-nocrop``: the same with ``crop_body=False`` (the whole grid is inferred);
* ``monai`` (baseline): the former pipeline path (whole-array normalisation, MONAI's
  full-buffer ``sliding_window_inference``, fp32, overlap 0.5, sw_batch 4, constant, argmax,
  labels back). It needs about ``4 (2 + C) + 12`` bytes a voxel (C = 11 classes: 13.9 GB at
  512 x 512 x 800). When ``MemAvailable`` is below that estimate + 2 GB it is measured on the
  same CT with the slices halved until it fits, and the full-size estimate is printed
  (``--skip-baseline-memory`` skips it).

``--threads`` torch threads (default 2) everywhere. The load average is printed: on the
shared 2-core machine other processes slow every figure.

Run: ``python benchmarks/segment.py [--parts speed,memory] [--model NAME] [--models-root DIR]
[--case pt_201] [--shape 256 256 128] [--repeats 3] [--no-ablation] [--threads 2]
[--memory-shape 512 512 800] [--memory-methods ours,ours-nocrop,monai]
[--skip-baseline-memory]``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.pipelines.segment.card import (
    AXIS_CODES,
    MODELS_ROOT,
    ModelCard,
    installed_models,
    resolve_model,
)
from models.pipelines.segment.geometry import nearest_back, network_shape, reorientation
from models.pipelines.segment.networks import FinalOutput, load_network
from models.pipelines.segment.params import SegmentParams
from models.pipelines.segment.pipeline import run, segment_volume
from models.provenance import file_sha256
from models.result import no_progress
from models.volume import Volume

THREADS = 2
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
MEMORY_NET = {"channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 1}
PATCH = (96, 96, 96)
CT_WINDOW = {"kind": "window", "lower": -500.0, "upper": 500.0}
BASELINE = "MONAI sliding_window_inference fp32, overlap 0.5, sw_batch 4, constant"


# ----------------------------------------------------------------------------- models


def install_random_model(
    root: Path,
    name: str,
    labels: tuple[str, ...],
    net_args: dict[str, Any],
    spacing: tuple[float, float, float],
) -> None:
    """A MONAI UNet with random weights (seed 0) as an installed model ``root/name``."""
    from monai.networks.nets import UNet

    torch.manual_seed(0)
    net = UNet(spatial_dims=3, in_channels=1, out_channels=len(labels) + 1, **net_args)
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), folder / "model.pt")
    card = {
        "name": name,
        "version": "0.0.0",
        "architecture": {"name": "unet3d", "args": net_args},
        "weights": {
            "file": "model.pt",
            "sha256": file_sha256(folder / "model.pt"),
            "format": "state-dict",
        },
        "modality": "CT",
        "spacing_mm": list(spacing),
        "orientation": "RAS",
        "intensity": CT_WINDOW,
        "patch_size": list(PATCH),
        "labels": [{"value": v + 1, "name": n} for v, n in enumerate(labels)],
        "training_data": "none: random weights (benchmark only)",
        "metrics": "none",
    }
    (folder / "card.json").write_text(json.dumps(card))


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


def synthetic_ct(size: tuple[int, int, int], spacing: tuple[float, float, float]) -> Volume:
    """The memory case: ``size`` = (columns, rows, slices), ``spacing`` = (col, row, slice) mm.

    Array ``(slices, rows, columns)`` float32 HU, LPS axes (i -> L, j -> P, k -> S), built one
    chunk of slices at a time (no full-size temporary).
    """
    nx, ny, nz = size
    y, x = np.mgrid[0:ny, 0:nx].astype(np.float32)
    x = (x - nx / 2) * spacing[0]  # mm, toward L
    y = (y - ny / 2) * spacing[1]  # mm, toward P
    half_x, half_y = nx * spacing[0] / 2, ny * spacing[1] / 2
    a, b, yc = 0.85 * half_x, 0.55 * half_y, -0.1 * half_y
    plane = np.full((ny, nx), -1000.0, np.float32)
    body = ((x / a) ** 2 + ((y - yc) / b) ** 2) <= 1.0
    plane[body] = 40.0
    for side in (-1.0, 1.0):  # lungs
        lung = (
            ((x - side * 0.45 * a) / (0.3 * a)) ** 2 + ((y - yc + 0.1 * b) / (0.6 * b)) ** 2
        ) <= 1
        plane[lung] = -800.0
    plane[(x**2 + (y - yc - 0.6 * b) ** 2) <= (0.12 * b) ** 2] = 700.0  # spine
    couch_top = yc + b + 10.0
    plane[(y >= couch_top) & (y <= couch_top + 20.0) & (np.abs(x) <= 0.9 * half_x)] = 100.0
    array = np.empty((nz, ny, nx), np.float32)
    rng = np.random.default_rng(0)
    step = max(1, (1 << 22) // (nx * ny))
    for z in range(0, nz, step):
        n = min(step, nz - z)
        array[z : z + n] = plane + rng.normal(0.0, 20.0, (n, ny, nx)).astype(np.float32)
    affine = np.eye(4)
    affine[:3, :3] = np.array(
        [[0, 0, spacing[0]], [0, spacing[1], 0], [spacing[2], 0, 0]], dtype=np.float64
    )  # columns: k -> +z (S), j -> +y (P), i -> +x (L)
    return Volume(array, affine, modality="CT", units="HU")


# ----------------------------------------------------------------------------- methods


def whole_array_normalise(array: np.ndarray, card: ModelCard) -> np.ndarray:
    """The former pipeline's normalisation (one whole-array expression, float32)."""
    x = np.asarray(array, dtype=np.float32)
    lo, hi = float(card.intensity.lower or 0.0), float(card.intensity.upper or 1.0)
    if card.intensity.kind == "window":
        return ((np.clip(x, lo, hi) - lo) / (hi - lo)).astype(np.float32)
    mean = float(x.mean()) if card.intensity.mean is None else card.intensity.mean
    std = float(x.std()) if card.intensity.std is None else card.intensity.std
    return ((x - mean) / max(std, 1e-6)).astype(np.float32)


def monai_baseline(
    image: Volume,
    card: ModelCard,
    network: FinalOutput,
    *,
    overlap: float = 0.5,
    sw_batch: int = 4,
    mode: str = "constant",
) -> np.ndarray:
    """The former pipeline path with MONAI's full-buffer sliding window; labels on the source."""
    import torch.nn.functional as F
    from monai.inferers import sliding_window_inference

    reo = reorientation(image.affine, card.orientation)
    canonical = reo.apply(image.array)
    canon_affine = reo.affine(image.affine, image.shape)
    spacing = tuple(float(s) for s in np.linalg.norm(canon_affine[:3, :3], axis=0))
    net_shape = network_shape(canonical.shape, spacing, card.spacing_mm)
    x = torch.from_numpy(np.ascontiguousarray(whole_array_normalise(canonical, card)))[None, None]
    if tuple(x.shape[2:]) != net_shape:
        x = F.interpolate(x, size=net_shape, mode="trilinear", align_corners=False)
    with torch.inference_mode():
        logits = sliding_window_inference(
            x, card.patch_size, sw_batch, network, overlap=overlap, mode=mode
        )
        assert isinstance(logits, torch.Tensor)
        classes = logits[0].argmax(0).to(torch.int32).numpy().astype(np.uint16)
    del logits, x
    return reo.invert(nearest_back(classes.astype(np.uint8), canonical.shape))


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
        base_t, base_labels = 0.0, None
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


# ----------------------------------------------------------------------------- memory


def _status(field: str) -> float:
    """A ``/proc/self/status`` memory field in GB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024 / 1e9
    return float("nan")


def _mem_available_gb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024 / 1e9
    return float("nan")


def baseline_estimate_gb(size: tuple[int, int, int], n_classes: int) -> float:
    """The baseline's peak, GB: input and normalised contiguous image (4 + 4 bytes a voxel),
    MONAI's output (4 C), then the int64 argmax and its int32 copy (12), plus ~0.5 GB of
    libraries (the count map, 4 bytes, is freed before the argmax)."""
    n = float(np.prod(size))
    return n * (4 + 4 + 4 * n_classes + 12) / 1e9 + 0.5


METHODS = {
    "ours": "ours: pipeline run (streamed, bf16, crop)",
    "ours-nocrop": "ours: pipeline run, crop_body off",
    "monai": f"baseline: {BASELINE}, full buffer",
}


def memory_child(args: argparse.Namespace) -> None:
    """One memory measurement (``--memory-child METHOD``); prints one JSON line."""
    with contextlib.suppress(OSError):  # the kernel's first choice if memory runs out
        Path("/proc/self/oom_score_adj").write_text("1000")
    torch.set_num_threads(args.threads)
    size = (args.memory_shape[0], args.memory_shape[1], args.memory_shape[2])
    spacing = (0.8, 0.8, 1.0)
    labels = tuple(f"organ {v}" for v in range(1, 11))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        install_random_model(root, "random-10-labels", labels, MEMORY_NET, spacing)
        image = synthetic_ct(size, spacing)
        rss_input = _status("VmRSS")
        start = time.perf_counter()
        extra: dict[str, object] = {}
        if args.memory_child in ("ours", "ours-nocrop"):
            params = SegmentParams.model_validate(
                {
                    "model": "random-10-labels",
                    "device": "cpu",
                    "crop_body": args.memory_child == "ours",
                },
                context={"models_root": root},
            )
            result = run({"image": image}, params, no_progress, models_root=root)
            out = result.label_maps["segmentation"].array
            geometry = result.measurements["geometry"]
            assert isinstance(geometry, dict)
            extra = {"body_crop": geometry["body_crop"]}
        else:
            card, network = load_network(root / "random-10-labels", "cpu")
            out = monai_baseline(image, card, network)
        seconds = time.perf_counter() - start
    print(
        json.dumps(
            {
                "method": args.memory_child,
                "peak_rss_gb": _status("VmHWM"),
                "rss_with_input_gb": rss_input,
                "seconds": seconds,
                "labels_shape": list(out.shape),
                **extra,
            }
        )
    )


def _child(method: str, size: tuple[int, int, int], threads: int) -> tuple[dict | None, str]:
    """Run one measurement in a subprocess: ``(result, "")`` or ``(None, why)``."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-child", method]
    cmd += ["--threads", str(threads), "--memory-shape", *(str(s) for s in size)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:]
        return None, f"failed (exit {proc.returncode}): {' '.join(tail)}"
    return json.loads(proc.stdout.strip().splitlines()[-1]), ""


def memory(args: argparse.Namespace) -> None:
    """The memory part: each method in a subprocess, peak RSS side by side.

    When the baseline does not fit (``MemAvailable`` < estimate + 2 GB), it is measured on
    the same CT with the slices halved until it fits, and its full-size estimate is printed.
    """
    size = (args.memory_shape[0], args.memory_shape[1], args.memory_shape[2])
    print("## Segmentation peak memory (CPU)")
    print(
        f"synthetic CT {size[0]} x {size[1]} x {size[2]} (columns x rows x slices), 0.8 x 0.8 x "
        f"1.0 mm, float32 HU ({np.prod(size) * 4 / 1e9:.2f} GB); random 10-label UNet "
        f"(channels 4, 8, 16), window {list(PATCH)}, network grid = the full grid; "
        f"{args.threads} torch threads; load average {os.getloadavg()}"
    )
    rows: list[tuple[str, tuple[int, int, int], dict | None, str]] = []
    for method in args.memory_methods:
        run_size, note = size, ""
        if method == "monai":
            estimate = baseline_estimate_gb(size, 11)
            if args.skip_baseline_memory:
                rows.append((method, size, None, f"skipped; estimated {estimate:.1f} GB"))
                continue
            available = _mem_available_gb()
            while baseline_estimate_gb(run_size, 11) + 2.0 > available and run_size[2] > 96:
                run_size = (run_size[0], run_size[1], max(96, run_size[2] // 2))
            if baseline_estimate_gb(run_size, 11) + 2.0 > available:
                rows.append(
                    (method, size, None, f"not run: ~{estimate:.1f} GB, {available:.1f} available")
                )
                continue
            if run_size != size:
                note = (
                    f"full size needs ~{estimate:.1f} GB (estimate; {available:.1f} GB "
                    f"available): measured at {run_size[2]} slices, estimate there "
                    f"{baseline_estimate_gb(run_size, 11):.1f} GB"
                )
        data, why = _child(method, run_size, args.threads)
        rows.append((method, run_size, data, why or note))
    print()
    print("| method | volume | peak RSS GB | RSS with input GB | seconds | note |")
    print("|---|---|---:|---:|---:|---|")
    for method, run_size, data, note in rows:
        volume = " x ".join(str(s) for s in run_size)
        if data is None:
            print(f"| {METHODS[method]} | {volume} | - | - | - | {note} |")
            continue
        crop = data.get("body_crop")
        if isinstance(crop, dict) and crop.get("applied"):
            note = f"crop: network box {crop['network_box']} ({crop['network_fraction']:.0%})"
        print(
            f"| {METHODS[method]} | {volume} | {data['peak_rss_gb']:.2f} | "
            f"{data['rss_with_input_gb']:.2f} | {data['seconds']:.1f} | {note} |"
        )
    print(f"load average at end: {os.getloadavg()}")


def parse_methods(text: str) -> list[str]:
    """``"ours,monai"`` -> those memory methods in their fixed order."""
    asked = {p.strip() for p in text.split(",") if p.strip()}
    if not asked or asked - set(METHODS):
        raise argparse.ArgumentTypeError(
            f"--memory-methods takes a subset of {','.join(METHODS)}, got {text!r}"
        )
    return [m for m in METHODS if m in asked]


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
    parser.add_argument(
        "--memory-shape",
        type=int,
        nargs=3,
        default=[512, 512, 800],
        help="columns rows slices of the synthetic CT",
    )
    parser.add_argument(
        "--memory-methods",
        type=parse_methods,
        default=list(METHODS),
        help=f"comma-separated subset of {','.join(METHODS)} (default all)",
    )
    parser.add_argument("--skip-baseline-memory", action="store_true")
    parser.add_argument("--memory-child", choices=list(METHODS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child:
        memory_child(args)
        return
    runners = {"speed": speed, "memory": memory}
    for index, part in enumerate(args.parts):
        if index:
            print(flush=True)
        runners[part](args)
        sys.stdout.flush()


if __name__ == "__main__":
    main()
