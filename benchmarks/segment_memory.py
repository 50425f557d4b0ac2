"""Segmentation peak-memory benchmark: our streamed sliding window vs MONAI's, on CPU.

A synthetic CT (HU) of ``--memory-shape`` columns x rows x slices (default 512 x 512 x 800,
0.8 x 0.8 x 1.0 mm, LPS, feet first along k): an elliptic body cylinder (soft tissue 40 HU,
two lungs -800 HU, a spine 700 HU, noise sigma 20 HU) above a 20 mm couch, air -1000 HU
elsewhere. Model: a 10-label MONAI UNet with random weights (channels 4, 8, 16), a 96³ window,
card spacing equal to the volume's (so the network grid is the full 512 x 512 x 800: the worst
case), installed into a temporary models root. Each method (``--memory-methods``, default all) runs
in its own subprocess (``benchmarks/segment_memory.py --memory-child METHOD``, its
``oom_score_adj`` raised so that the kernel would kill it before anything else), which reports
its peak RSS (``VmHWM``), the RSS once the input volume exists, and its wall time:

* ``ours``: the pipeline ``run`` with our defaults (model load with sha256, everything
  ``segment_volume`` does, the overlay figure and label volumes);
* ``ours-nocrop``: the same with ``crop_body=False`` (the whole grid is inferred);
* ``monai`` (baseline): the former pipeline path (whole-array normalisation, MONAI's
  full-buffer ``sliding_window_inference``, fp32, overlap 0.5, sw_batch 4, constant, argmax,
  labels back). It needs about ``4 (2 + C) + 12`` bytes a voxel (C = 11 classes: 13.9 GB at
  512 x 512 x 800). When ``MemAvailable`` is below that estimate + 2 GB it is measured on the
  same CT with the slices halved until it fits, and the full-size estimate is printed; when even
  96 slices do not fit, its row says "not run" with the estimated need
  (``--skip-baseline-memory`` skips it).

``--threads`` torch threads (default 2). The load average is printed: on the shared 2-core
machine other processes slow every figure. ``benchmarks/segment.py`` runs this part too
(``--parts memory``, or by default after its speed part), with the same flags.

Run: ``python benchmarks/segment_memory.py [--memory-shape 512 512 800]
[--memory-methods ours,ours-nocrop,monai] [--skip-baseline-memory] [--threads 2]``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.segment_common import (
    BASELINE,
    PATCH,
    THREADS,
    install_random_model,
    monai_baseline,
)
from models.pipelines.segment.networks import load_network
from models.pipelines.segment.params import SegmentParams
from models.pipelines.segment.pipeline import run
from models.result import no_progress
from models.volume import Volume

MEMORY_NET = {"channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 1}
METHODS = {
    "ours": "ours: pipeline run (streamed, bf16, crop)",
    "ours-nocrop": "ours: pipeline run, crop_body off",
    "monai": f"baseline: {BASELINE}, full buffer",
}


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
    """The memory benchmark: each method in a subprocess, peak RSS side by side.

    When the baseline does not fit (``MemAvailable`` < estimate + 2 GB), it is measured on
    the same CT with the slices halved until it fits, and its full-size estimate is printed.

    Args:
        args: ``threads``, ``memory_shape`` (columns, rows, slices), ``memory_methods`` and
            ``skip_baseline_memory``, as :func:`add_arguments` and ``--threads`` define them.
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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The memory benchmark's flags (all but ``--threads``), shared with ``segment.py``."""
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=THREADS, help="torch threads")
    add_arguments(parser)
    parser.add_argument("--memory-child", choices=list(METHODS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child:
        memory_child(args)
        return
    memory(args)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
