"""Reconstruction benchmarks: speed (ours vs ASTRA CPU vs scikit-image), quality, flicking.

One command runs three parts (``--parts speed,quality,flicking``, default all, in that order):

* ``speed`` (this module, described below): FBP, SIRT and CGLS, ours vs ASTRA CPU vs
  scikit-image, on a 512 x 512 slice.
* ``quality`` (:mod:`benchmarks.recon_quality`): PSNR/SSIM of FBP, SIRT, CGLS, TV and the
  learned network on held-out OpenKBP validation slices, simulated fan beam with Poisson noise
  at 18/36/60/90 views plus the 720-view FBP, and the issue's targets; its options are passed
  with ``--quality-args "..."`` (e.g. ``"--patients 2 --learned-weights W.pt --json q.json"``).
* ``flicking`` (:mod:`benchmarks.sinogram_flicking`): sinogram flicking vs image-domain
  zero-shot vs BM3D on simulated low dose, with small defaults (``--flicking-args``).

``--threads`` is handed to all three parts (a part's own ``--threads`` in its args wins).

Speed part:

Data: a real 512 x 512 CT slice (dcmqi ct-3slice/01.dcm, GE LightSpeed, 0.81 mm pixels),
converted to attenuation (``hu_to_mu``), projected in parallel beam over 180 degrees with our
default geometry (726 bins of the pixel size), with Poisson noise (I0 = 1e6 photons per bin,
seed 0). Every method reconstructs the same noisy sinogram (scikit-image: the same noise drawn
on its own ``radon`` of the slice, as its geometry differs).

* FBP, ram-lak: ours (torch, 2 threads), ASTRA CPU ``FBP`` (``linear`` projector,
  single-threaded), scikit-image ``iradon`` (filter ``ramp``, circle=False).
* 50 iterations (note: residual ``||A x - y|| / ||y||`` with our projector): our ``sirt``
  (no constraint, like ASTRA's default) and ``cgls`` vs ASTRA's CPU ``SIRT`` and ``CGLS``, and
  scikit-image ``iradon_sart`` (SART: one call = one sweep of all views, so 50 calls;
  relaxation 0.15 as its docs suggest; not the same algorithm).

Times: seconds of wall time (FBP best of ``--repeats``; iterative methods one run each,
projector set-up excluded for all). PSNR: HU window [-1000, 1000] (clipped) inside the body
mask of the slice (``estimate_body_mask``), data range 2000 HU. The ratio column (on ASTRA's
rows) is our time over ASTRA's for the same task. ``iradon_sart`` sweeps stop after
``--sart-budget-s`` seconds; its time is then scaled to 50 sweeps (said in the note). The
load average is printed: on the shared 2-core machine,
other processes slow every figure.

Run: ``python benchmarks/recon.py [--parts speed,quality,flicking] [--views 60 720]
[--iterations 50] [--repeats 3] [--no-skimage] [--cache-mb 256] [--threads 2]
[--sart-budget-s 90] [--quality-args "..."] [--flicking-args "..."]`` (``--views`` and
``--iterations`` are the speed part's).
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.physics.geometry import ParallelBeamGeometry
from models.physics.iterative import cgls, data_residual, sirt
from models.physics.lowdose import MU_WATER_PER_MM, estimate_body_mask, hu_to_mu
from models.physics.projector import TorchParallelProjector

SLICE = Path(__file__).resolve().parents[2] / "shared" / "data" / "dcmqi" / "ct-3slice" / "01.dcm"
THREADS = 2
I0 = 1e6
PARTS = ("speed", "quality", "flicking")
FLICKING_ARGS = "--patients 1 --iterations 200 --features 32"
"""Small defaults of the flicking part (its own defaults take 3 patients x 300 iterations)."""


def load_slice() -> tuple[np.ndarray, float]:
    import pydicom

    ds = pydicom.dcmread(SLICE)
    hu = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    return hu, float(ds.PixelSpacing[0])


class Metric:
    def __init__(self, hu: np.ndarray) -> None:
        self.reference = np.clip(hu, -1000.0, 1000.0).astype(np.float64)
        self.body = estimate_body_mask(hu)

    def psnr(self, mu: np.ndarray) -> float:
        hu = np.clip(1000.0 * (mu.astype(np.float64) / MU_WATER_PER_MM - 1.0), -1000.0, 1000.0)
        mse = float(np.mean((hu[self.body] - self.reference[self.body]) ** 2))
        return 10.0 * math.log10(2000.0**2 / mse)


def noisy(line_integrals: np.ndarray, seed: int = 0) -> np.ndarray:
    counts = np.random.default_rng(seed).poisson(I0 * np.exp(-line_integrals.astype(np.float64)))
    return (-np.log(np.maximum(counts, 1.0) / I0)).astype(np.float32)


def timed(fn: Callable[[], Any], repeats: int = 1) -> tuple[float, Any]:
    best, result = math.inf, None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def astra_run(astra: Any, proj: Any, name: str, sino: np.ndarray, iterations: int) -> np.ndarray:
    """One ASTRA CPU algorithm run on the wrapper's geometry; result in 1/mm."""
    data2d = astra.data2d
    sino_id = data2d.create("-sino", proj._proj_geom, sino / proj.geometry.pixel_size_mm)
    rec_id = data2d.create("-vol", proj._vol_geom, 0.0)
    config = astra.astra_dict(name)
    config.update(
        ProjectorId=proj._projector_id, ProjectionDataId=sino_id, ReconstructionDataId=rec_id
    )
    if name == "FBP":
        config["FilterType"] = "ram-lak"
    alg_id = astra.algorithm.create(config)
    try:
        astra.algorithm.run(alg_id, iterations)
        return np.asarray(data2d.get(rec_id), dtype=np.float32)
    finally:
        astra.algorithm.delete(alg_id)
        data2d.delete([sino_id, rec_id])


class Rows(list[tuple[str, str, float, float, str]]):
    """Result rows ``(task, method, seconds, psnr, note)``, printed as they arrive."""

    def __init__(self, views: int) -> None:
        super().__init__()
        self.views = views

    def append(self, row: tuple[str, str, float, float, str]) -> None:
        super().append(row)
        task, method, t, db, note = row
        ours = [r[2] for r in self if r[0] == task and r[1] == "ours"]
        ratio = f"{ours[0] / t:.2f}" if method == "ASTRA" and ours else "-"
        print(f"{self.views:>5}  {task:<12}{method:<21}{t:>9.3f}{ratio:>12}{db:>9.2f}  {note}")
        sys.stdout.flush()


def run_views(
    mu: np.ndarray, pixel: float, metric: Metric, views: int, args: argparse.Namespace
) -> Rows:
    """Rows ``(task, method, seconds, psnr, note)`` for one view count."""
    rows = Rows(views)
    geometry = ParallelBeamGeometry(mu.shape[0], pixel, views)
    ours = TorchParallelProjector(geometry, num_threads=args.threads, cache_mb=args.cache_mb)
    sino = noisy(ours.forward(mu))
    t, image = timed(lambda: ours.fbp(sino), args.repeats)
    rows.append(("FBP", "ours", t, metric.psnr(image), ""))
    astra = None
    if importlib.util.find_spec("astra") is not None:
        import astra as astra_module

        from models.physics.astra_backend import AstraParallelProjector

        astra = (astra_module, AstraParallelProjector(geometry))
        t, image = timed(lambda: astra_run(*astra, "FBP", sino, 1), args.repeats)
        rows.append(("FBP", "ASTRA", t, metric.psnr(image), ""))
    theta = np.linspace(0.0, 180.0, views, endpoint=False)
    sk_sino = None
    if not args.no_skimage:
        from skimage.transform import iradon, radon

        sk_sino = noisy(radon(mu, theta, circle=False) * pixel) / pixel  # per-pixel sums
        t, image = timed(
            lambda: iradon(
                sk_sino, theta, circle=False, output_size=mu.shape[0], filter_name="ramp"
            ),
            args.repeats,
        )
        rows.append(("FBP", "skimage iradon", t, metric.psnr(image), ""))
    its = args.iterations
    for task, method in (("SIRT", sirt), ("CGLS", cgls)):
        kwargs = {"nonnegative": False} if method is sirt else {}
        t, rec = timed(lambda m=method, kw=kwargs: m(sino, ours, its, **kw))  # type: ignore[misc]
        note = f"residual {rec.report.residual:.4f}"
        rows.append((f"{task} {its} it", "ours", t, metric.psnr(rec.image), note))
        if astra is not None:
            t, image = timed(lambda name=task: astra_run(*astra, name, sino, its))  # type: ignore[misc]
            note = f"residual {data_residual(image, sino, ours):.4f}"
            rows.append((f"{task} {its} it", "ASTRA", t, metric.psnr(image), note))
    if sk_sino is not None:
        from skimage.transform import iradon_sart

        sweeps = [0]

        def sart() -> np.ndarray:
            image = None
            start = time.perf_counter()
            for _ in range(its):
                image = iradon_sart(sk_sino, theta, image, relaxation=0.15)
                sweeps[0] += 1
                if time.perf_counter() - start > args.sart_budget_s:
                    break
            # iradon_sart reconstructs radon's padded square: crop it back as radon padded it
            n, padded = mu.shape[0], np.asarray(image).shape[0]
            before = (n + padded - n) // 2 - n // 2
            return np.asarray(image)[before : before + n, before : before + n]

        t, image = timed(sart)
        note = "SART"
        if sweeps[0] < its:  # stopped at the time budget: time scaled to `its` sweeps
            note = f"SART: {sweeps[0]} sweeps timed, x {its / sweeps[0]:.1f}; PSNR after them"
            t *= its / sweeps[0]
        rows.append((f"SART {its} it", "skimage iradon_sart", t, metric.psnr(image), note))
    return rows


def speed(args: argparse.Namespace) -> None:
    """The speed part: every method at every ``args.views``, rows printed as they come."""
    torch.set_num_threads(args.threads)
    hu, pixel = load_slice()
    mu = hu_to_mu(hu)
    metric = Metric(hu)
    print("## Reconstruction speed")
    print(f"slice {SLICE.name}: {hu.shape[0]}x{hu.shape[1]}, {pixel:.3f} mm, I0 = {I0:g}")
    print(f"ours: {args.threads} torch threads, cache_mb={args.cache_mb:g}; ASTRA CPU: 1 thread")
    print(f"load average at start: {os.getloadavg()}")
    header = f"{'views':>5}  {'task':<12}{'method':<21}{'seconds':>9}{'ours/ASTRA':>12}"
    print(f"{header}{'PSNR dB':>9}  note")
    for views in args.views:
        run_views(mu, pixel, metric, views, args)
    print(f"load average at end: {os.getloadavg()}")


def quality(args: argparse.Namespace) -> None:
    """The quality part: :func:`benchmarks.recon_quality.main` with ``--quality-args``."""
    from benchmarks import recon_quality

    recon_quality.main(["--threads", str(args.threads), *shlex.split(args.quality_args)])


def flicking(args: argparse.Namespace) -> None:
    """The flicking part: :func:`benchmarks.sinogram_flicking.main` with ``--flicking-args``."""
    from benchmarks import sinogram_flicking

    print("## Sinogram flicking vs image-domain zero-shot vs BM3D (simulated low dose)")
    argv = sys.argv
    sys.argv = [
        "sinogram_flicking",
        "--threads",
        str(args.threads),
        *shlex.split(args.flicking_args),
    ]
    try:
        sinogram_flicking.main()  # it parses sys.argv itself
    finally:
        sys.argv = argv


def parse_parts(text: str) -> list[str]:
    """``"speed,quality"`` -> the parts in their fixed order; unknown names are an error."""
    asked = {p.strip() for p in text.split(",") if p.strip()}
    unknown = asked - set(PARTS)
    if unknown or not asked:
        raise argparse.ArgumentTypeError(
            f"--parts takes a comma-separated subset of {','.join(PARTS)}, got {text!r}"
        )
    return [p for p in PARTS if p in asked]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--parts",
        type=parse_parts,
        default=list(PARTS),
        help=f"comma-separated subset of {','.join(PARTS)} (default all)",
    )
    parser.add_argument("--views", type=int, nargs="+", default=[60, 720])
    parser.add_argument("--iterations", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-skimage", action="store_true")
    parser.add_argument("--threads", type=int, default=THREADS, help="torch threads, all parts")
    parser.add_argument(
        "--sart-budget-s", type=float, default=90.0, help="stop iradon_sart sweeps after this"
    )
    parser.add_argument(
        "--cache-mb", type=float, default=256.0, help="our projector's grid cache (MB)"
    )
    parser.add_argument(
        "--quality-args", default="", help="options of benchmarks/recon_quality.py (one string)"
    )
    parser.add_argument(
        "--flicking-args",
        default=FLICKING_ARGS,
        help=f"options of benchmarks/sinogram_flicking.py (default {FLICKING_ARGS!r})",
    )
    args = parser.parse_args(argv)
    runners = {"speed": speed, "quality": quality, "flicking": flicking}
    for index, part in enumerate(args.parts):
        if index:
            print(flush=True)
        runners[part](args)
        sys.stdout.flush()


if __name__ == "__main__":
    main()
