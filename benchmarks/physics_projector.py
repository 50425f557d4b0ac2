"""Projector benchmark: forward projection and FBP time and quality, ours vs ASTRA vs skimage.

512 x 512 Shepp-Logan phantom (skimage), parallel beam over 180 degrees, 60 and 720 views,
detector = ceil(N sqrt 2)-ish bins of the pixel size (our default geometry; skimage uses its
own radon geometry). PSNR of the ram-lak FBP against the phantom inside the inscribed circle
(r < N/2 - 1 pixels), data range 1.0, no clipping. Times are the best of ``--repeats`` runs
(skimage: one run), in seconds of wall time. Ours uses 2 torch threads; ASTRA's and skimage's
CPU code is single-threaded. Also prints our adjoint time, a 512^2 x 720-view low-dose
simulation time and the peak memory of our projector at 720 views (separate process).

Run: ``python benchmarks/physics_projector.py [--repeats 3] [--no-skimage]``.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.physics.geometry import ParallelBeamGeometry
from models.physics.lowdose import simulate_low_dose
from models.physics.projector import TorchParallelProjector

N = 512
VIEWS = (60, 720)
THREADS = 2


def phantom() -> np.ndarray:
    from skimage.data import shepp_logan_phantom
    from skimage.transform import resize

    return resize(shepp_logan_phantom(), (N, N), anti_aliasing=True).astype(np.float32)


def circle_mask() -> np.ndarray:
    yy, xx = np.mgrid[:N, :N]
    return np.hypot(xx - (N - 1) / 2, yy - (N - 1) / 2) < N / 2 - 1


def psnr(image: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> float:
    mse = float(np.mean((image[mask].astype(np.float64) - truth[mask]) ** 2))
    return 10 * math.log10(1.0 / mse)


def best_time(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    best, result = math.inf, None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def run_ours(image: np.ndarray, views: int, repeats: int) -> dict[str, float]:
    proj = TorchParallelProjector(ParallelBeamGeometry(N, 1.0, views), num_threads=THREADS)
    t_fp, sino = best_time(lambda: proj.forward(image), repeats)
    t_fbp, recon = best_time(lambda: proj.fbp(sino), repeats)
    t_adj, _ = best_time(lambda: proj.adjoint(sino), max(1, repeats - 1))
    return {"fp": t_fp, "fbp": t_fbp, "adj": t_adj, "psnr": psnr(recon, image, circle_mask())}


def run_astra(image: np.ndarray, views: int, repeats: int) -> dict[str, float]:
    from models.physics.astra_backend import AstraParallelProjector

    proj = AstraParallelProjector(ParallelBeamGeometry(N, 1.0, views))
    t_fp, sino = best_time(lambda: proj.forward(image), repeats)
    t_fbp, recon = best_time(lambda: proj.fbp(sino), repeats)
    t_adj, _ = best_time(lambda: proj.adjoint(sino), max(1, repeats - 1))
    return {"fp": t_fp, "fbp": t_fbp, "adj": t_adj, "psnr": psnr(recon, image, circle_mask())}


def run_skimage(image: np.ndarray, views: int) -> dict[str, float]:
    from skimage.transform import iradon, radon

    theta = np.linspace(0.0, 180.0, views, endpoint=False)
    t_fp, sino = best_time(lambda: radon(image, theta, circle=False), 1)
    t_fbp, recon = best_time(
        lambda: iradon(sino, theta, circle=False, output_size=N, filter_name="ramp"), 1
    )
    return {"fp": t_fp, "fbp": t_fbp, "adj": math.nan, "psnr": psnr(recon, image, circle_mask())}


def peak_memory_child() -> None:
    """Child mode: RSS before, and peak RSS after, FP + FBP + adjoint of 512^2 x 720 views (MB)."""
    torch.set_num_threads(THREADS)
    proj = TorchParallelProjector(ParallelBeamGeometry(N, 1.0, 720))
    image = np.random.default_rng(0).random((N, N)).astype(np.float32)
    before = _status_mb("VmRSS")
    sino = proj.forward(image)
    proj.fbp(sino)
    proj.adjoint(sino)
    after = max(_status_mb("VmHWM"), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print(f"{before:.0f} {after:.0f}")


def _status_mb(field: str) -> float:
    """A memory field of /proc/self/status (Linux), in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return float(line.split()[1]) / 1024
    return math.nan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-skimage", action="store_true")
    parser.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        peak_memory_child()
        return
    torch.set_num_threads(THREADS)
    image = phantom()
    print(f"load average at start: {os.getloadavg()}")
    rows = []
    for views in VIEWS:
        rows.append(("ours (torch, 2 thr)", views, run_ours(image, views, args.repeats)))
        if importlib.util.find_spec("astra") is not None:
            rows.append(("ASTRA CPU (linear)", views, run_astra(image, views, args.repeats)))
        if not args.no_skimage:
            rows.append(("skimage radon/iradon", views, run_skimage(image, views)))
    print(f"\n{N}x{N} Shepp-Logan, ram-lak FBP, PSNR inside the inscribed circle (range 1.0)")
    print(f"{'backend':<22}{'views':>6}{'FP s':>9}{'FBP s':>9}{'adjoint s':>11}{'PSNR dB':>9}")
    for name, views, r in rows:
        print(
            f"{name:<22}{views:>6}{r['fp']:>9.3f}{r['fbp']:>9.3f}{r['adj']:>11.3f}{r['psnr']:>9.2f}"
        )
    slice_hu = np.where(image > 0, image * 1000.0, -1000.0).astype(np.float32)
    t_sim, _ = best_time(lambda: simulate_low_dose(slice_hu, 0.7, 1e4, 720, seed=0), 2)
    print(f"\nsimulate_low_dose 512^2, 720 views, 2 bins/pixel (default): {t_sim:.2f} s")
    out = subprocess.run(
        [sys.executable, __file__, "--memory-child"], capture_output=True, text=True, check=True
    ).stdout.split()
    print(
        f"peak RSS of a process doing ours FP+FBP+adjoint at 720 views: {out[1]} MB "
        f"(RSS before the calls: {out[0]} MB)"
    )
    print(f"load average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
