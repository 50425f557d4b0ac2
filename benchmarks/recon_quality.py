"""Reconstruction quality benchmark: FBP, SIRT, CGLS, TV and the learned method, sparse views.

Data: held-out real CT, the OpenKBP *validation* patients of ``splits.json`` (QC-flagged ones
dropped, :func:`models.training.sparse_view_data.openkbp_split`; the training never sees them),
read as the training reads them (``workers.train_sparse_view._lps_volume``, LPS axes) and cut
into axial slices with the training defaults (``axial_slices``: padded with air to a square,
resampled to ``--image-size`` 128, every ``--slice-stride`` 2nd slice, near-empty slices
dropped). ``--slices`` evenly spaced slices per patient are kept, picked like
``make_validation_set`` picks them; with the default 8 patients x 2 slices they are the
training run's validation slices (monitored during training, never trained on).

Simulation (the training's scanner, :class:`SparseViewSimulator` / ``fan_geometry``): 360 degree
equiangular fan beam, source-isocentre 595 mm, source-detector 1085.6 mm, two detector bins per
pixel at the isocentre, Poisson noise at ``--i0`` 1e5 photons per bin and view, ``-log``. The
noise seed of patient ``i`` (its position in the benchmark's list) at ``v`` views is
``--seed + 1000 i + v``, the rule of ``make_validation_set`` (so the FBP inputs at 18/36/60 views
are exactly the training's validation inputs). Every method reconstructs the same noisy
sinogram of a slice:

* ``FBP``: Ram-Lak FBP (the projector's).
* ``SIRT``: :func:`models.physics.iterative.sirt`, non-negative, ``--sirt-iterations``
  (default: the pipeline's ``DEFAULT_ITERATIONS``, 200).
* ``CGLS``: :func:`cgls`, unconstrained, ``--cgls-iterations`` (default 12, semi-convergence).
* ``TV``: :func:`tv_pdhg`, non-negative, ``--tv-iterations`` (200) and ``--tv-weight`` (the
  pipeline's default 0.002, relative to the mean summed path length ``mean(A^T 1)``).
* ``network``: the GloReDi-style network (``models.pipelines.sparse_view_ct.learned``) applied
  to the FBP slice; weights from ``--learned-weights``, else the ``weights`` of the
  ``sparse-view-ct`` registry record (or the pipeline's ``LEARNED_WEIGHTS``); with none the
  ``network`` and ``learned`` columns are skipped ("learned: no weights"). It was trained at
  18/36/60 views: 90 views is outside its training range.
* ``learned``: the pipeline's ``learned`` method: the network, then its data-consistency step
  (``reconstruct.refine_slice``: ``--dc-iterations`` of TV least squares with weight
  ``--dc-tv-weight``, started from and anchored to the network output with
  ``--dc-anchor-weight``; the pipeline's defaults, tuned on patients pt_210-213, which this
  benchmark does not report by default).
* ``TV weak``: TV from zero with the data-consistency step's weight and
  ``--tv-weak-iterations`` (default twice the step's): the classical method tuned like
  ``learned``'s refinement, to show what the network adds.
* ``FBP`` at 720 views: the reference row (a full-view scan at the same dose per view).

Metrics against the real slice (the target): PSNR and SSIM (``metrics.psnr_db`` /
``metrics.ssim_in_mask``) inside the body mask of the target (largest region > -500 HU, holes
filled, ``estimate_body_mask``), both images clipped to the HU window [-1000, 1000] (data range
2000 HU); per slice, then the mean over slices. Seconds: wall time per slice of each method on
this machine's CPU (``--threads`` torch threads; projector set-up excluded; ``network`` and
``learned`` include their FBP). On a shared machine the seconds are noisy.

Targets (issue 5), on the pipeline's ``learned``: learned >= FBP + 8 dB at 18 and at 60 views;
learned at 60 views above FBP at 720 views. Printed as PASS/FAIL with the numbers (not checked
without learned weights).

Run: ``python benchmarks/recon_quality.py [--patients 8] [--slices 2] [--views 18 36 60 90]
[--learned-weights PATH] [--threads 1] [--json PATH]`` (also part of ``benchmarks/recon.py``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.physics.iterative import cgls, sirt, tv_pdhg
from models.physics.lowdose import (
    BODY_THRESHOLD_HU,
    estimate_body_mask,
    hu_to_mu,
    mu_to_hu,
    noisy_line_integrals,
)
from models.pipelines.sparse_view_ct.metrics import HU_WINDOW, psnr_db, ssim_in_mask
from models.pipelines.sparse_view_ct.params import (
    DC_DEFAULTS,
    DC_ITERATIONS,
    DEFAULT_ITERATIONS,
    SparseViewCTParams,
)
from models.training.sparse_view_data import (
    CTCase,
    SimulationConfig,
    SparseViewSimulator,
    axial_slices,
    openkbp_split,
)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
VIEWS = (18, 36, 60, 90)
REFERENCE_VIEWS = 720
TARGET_GAIN_DB = 8.0
"""Issue 5: learned must beat FBP by this much (dB) at 18 and 60 views."""
METHODS = ("FBP", "SIRT", "CGLS", "TV", "TV weak", "network", "learned")

F32 = npt.NDArray[np.float32]


@dataclass(frozen=True)
class Score:
    """One method on one slice: PSNR (dB), SSIM (1) in the body mask, wall seconds."""

    psnr_db: float
    ssim: float
    seconds: float


def load_cases(
    data: Path,
    patients: int,
    slices: int,
    image_size: int = 128,
    slice_stride: int = 2,
    skip: int = 0,
) -> list[CTCase]:
    """The first ``patients`` OpenKBP validation patients (after ``skip``), ``slices`` each.

    Returns:
        Cases whose ``slices_hu`` is ``(slices, image_size, image_size)`` float32 HU (fewer when
        a patient has fewer slices), rows +y, cols +x; ``pixel_size_mm`` after resampling.
    """
    from workers.train_sparse_view import _lps_volume

    kbp = data / "openkbp"
    _, val_ids = openkbp_split(json.loads((kbp / "splits.json").read_text()))
    cases: list[CTCase] = []
    for case in val_ids[skip:]:
        if len(cases) == patients:
            break
        volume, pixel = _lps_volume(kbp / case / "ct.nii.gz")
        all_slices, out_pixel = axial_slices(volume, pixel, image_size, slice_stride)
        count = all_slices.shape[0]
        if count == 0:
            continue
        picks = np.unique(np.linspace(0, count - 1, slices + 2)[1:-1].round().astype(int))
        cases.append(CTCase(f"openkbp/{case}", all_slices[picks], out_pixel))
    return cases


def registered_weights() -> Path | None:
    """The registered learned weights, or ``None``.

    The ``weights`` of the ``sparse-view-ct`` registry record, else the pipeline's
    ``LEARNED_WEIGHTS`` (both relative to the ``models`` package), else ``None``.
    """
    from models.pipelines.sparse_view_ct.learned import MODELS_DIR
    from models.pipelines.sparse_view_ct.params import LEARNED_WEIGHTS
    from models.registry import get_spec

    weights = get_spec("sparse-view-ct").weights or LEARNED_WEIGHTS
    return None if weights is None else MODELS_DIR / weights


def _score(image_hu: F32, target_hu: F32, seconds: float) -> Score:
    mask = estimate_body_mask(target_hu)
    return Score(
        psnr_db(image_hu, target_hu, mask),
        ssim_in_mask(image_hu[None], target_hu[None], mask[None]),
        seconds,
    )


def evaluate(
    cases: Sequence[CTCase],
    views: Sequence[int],
    *,
    iterations: dict[str, int],
    tv_weight: float,
    i0: float = 1e5,
    seed: int = 12345,
    net: Any = None,
    learned: SparseViewCTParams | None = None,
    tv_weak: tuple[int, float] = (0, DC_DEFAULTS["tv_weight"]),
    log: bool = True,
    after_case: Callable[[int, dict[str, dict[int, list[Score]]]], None] | None = None,
) -> dict[str, dict[int, list[Score]]]:
    """Scores of every method at every view count on every slice.

    Args:
        cases: From :func:`load_cases`: ``(K, N, N)`` HU slices each.
        views: Sparse view counts (over 360 degrees); the 720-view FBP reference is added.
        iterations: ``{"sirt": n, "cgls": n, "tv": n}``; a method with 0 iterations is skipped.
        tv_weight: TV strength relative to ``mean(A^T 1)`` (see ``tv_pdhg``).
        i0: Photons per detector bin and view.
        seed: Base noise seed (seed of patient ``i`` at ``v`` views: ``seed + 1000 i + v``).
        net: A loaded GloReDiNet for ``network`` and ``learned``, or ``None`` to skip both.
        learned: Parameters of the pipeline's ``learned`` method (its data-consistency step);
            ``None``: the pipeline's defaults. ``data_consistency="none"`` makes ``learned``
            the network output.
        tv_weak: ``(iterations, tv_weight)`` of the ``TV weak`` row (TV from zero with the
            data-consistency step's weight); 0 iterations skips it.
        log: Print one progress line per patient and view count.
        after_case: Called with ``(patients done, scores so far)`` after every patient.

    Returns:
        ``{method: {views: [Score per slice]}}``; ``"FBP"`` also has ``REFERENCE_VIEWS``.
    """
    from models.pipelines.sparse_view_ct.learned import postprocess
    from models.pipelines.sparse_view_ct.reconstruct import refine_slice

    learned = learned if learned is not None else SparseViewCTParams(method="learned")
    its_of = {**iterations, "tv weak": tv_weak[0]}

    sim = SparseViewSimulator(SimulationConfig(views=tuple(views), i0=i0))
    out: dict[str, dict[int, list[Score]]] = {}

    def add(method: str, v: int, score: Score) -> None:
        out.setdefault(method, {}).setdefault(v, []).append(score)

    for index, case in enumerate(cases):
        targets = case.slices_hu
        for v in (*views, REFERENCE_VIEWS):
            started = time.perf_counter()
            proj = sim.projector(targets.shape[-1], case.pixel_size_mm, v)
            clean = proj.forward(hu_to_mu(targets))
            noisy = noisy_line_integrals(clean, i0, np.random.default_rng(seed + 1000 * index + v))
            for k, target in enumerate(targets):
                t = time.perf_counter()
                fbp = mu_to_hu(proj.fbp(noisy[k]))
                fbp_s = time.perf_counter() - t
                add("FBP", v, _score(fbp, target, fbp_s))
                if v == REFERENCE_VIEWS:
                    continue
                if net is not None:
                    t = time.perf_counter()
                    network = postprocess(fbp[None], v, net)[0]
                    net_s = fbp_s + time.perf_counter() - t
                    add("network", v, _score(network, target, net_s))
                    if learned.data_consistency == "tv":
                        t = time.perf_counter()
                        image, _ = refine_slice(
                            noisy[k], proj, hu_to_mu(network), learned, lambda _f: None
                        )
                        network = mu_to_hu(image)
                        net_s += time.perf_counter() - t
                    add("learned", v, _score(network, target, net_s))
                for method, fn, kwargs in (
                    ("SIRT", sirt, {"nonnegative": True}),
                    ("CGLS", cgls, {}),
                    ("TV", tv_pdhg, {"tv_weight": tv_weight, "nonnegative": True}),
                    ("TV weak", tv_pdhg, {"tv_weight": tv_weak[1], "nonnegative": True}),
                ):
                    its = its_of[method.lower()]
                    if its <= 0:
                        continue
                    t = time.perf_counter()
                    rec = fn(noisy[k], proj, its, **kwargs)
                    seconds = time.perf_counter() - t
                    add(method, v, _score(mu_to_hu(rec.image), target, seconds))
            if log:
                now = ", ".join(
                    f"{m} {np.mean([s.psnr_db for s in by[v][-len(targets) :]]):.2f}"
                    for m, by in out.items()
                    if v in by
                )
                print(
                    f"  {case.case_id} ({len(targets)} slices, {case.pixel_size_mm:.2f} mm) "
                    f"{v:>4} views, PSNR dB: {now}; {time.perf_counter() - started:.1f} s",
                    flush=True,
                )
        if after_case is not None:
            after_case(index + 1, out)
    return out


def summarise(scores: dict[str, dict[int, list[Score]]]) -> dict[str, dict[int, dict[str, Any]]]:
    """Mean PSNR (dB), SSIM and seconds per slice of every method and view count."""
    return {
        method: {
            v: {
                "psnr_db": float(np.mean([s.psnr_db for s in rows])),
                "ssim": float(np.mean([s.ssim for s in rows])),
                "seconds_per_slice": float(np.mean([s.seconds for s in rows])),
                "slices": len(rows),
            }
            for v, rows in sorted(by_views.items())
        }
        for method, by_views in scores.items()
    }


def target_checks(summary: dict[str, dict[int, dict[str, Any]]]) -> list[dict[str, Any]]:
    """The issue's targets: ``{"target", "passed" (bool or None if not measurable), "text"}``."""
    checks: list[dict[str, Any]] = []
    learned, fbp = summary.get("learned", {}), summary.get("FBP", {})
    for v in (18, 60):
        name = f"learned >= FBP + {TARGET_GAIN_DB:g} dB at {v} views"
        if v not in learned or v not in fbp:
            why = "learned: no weights" if not learned else f"{v} views not run"
            checks.append({"target": name, "passed": None, "text": f"NOT CHECKED ({why})"})
            continue
        gain = learned[v]["psnr_db"] - fbp[v]["psnr_db"]
        passed = gain >= TARGET_GAIN_DB
        text = (
            f"{'PASS' if passed else 'FAIL'}: learned {learned[v]['psnr_db']:.2f} - FBP "
            f"{fbp[v]['psnr_db']:.2f} = {gain:+.2f} dB (target >= +{TARGET_GAIN_DB:g})"
        )
        checks.append({"target": name, "passed": passed, "gain_db": gain, "text": text})
    name = f"learned at 60 views > FBP at {REFERENCE_VIEWS} views"
    if 60 not in learned or REFERENCE_VIEWS not in fbp:
        why = "learned: no weights" if not learned else "60 views not run"
        checks.append({"target": name, "passed": None, "text": f"NOT CHECKED ({why})"})
    else:
        a, b = learned[60]["psnr_db"], fbp[REFERENCE_VIEWS]["psnr_db"]
        passed = a > b
        text = (
            f"{'PASS' if passed else 'FAIL'}: learned@60 {a:.2f} dB vs FBP@{REFERENCE_VIEWS} "
            f"{b:.2f} dB ({a - b:+.2f} dB)"
        )
        checks.append({"target": name, "passed": passed, "margin_db": a - b, "text": text})
    return checks


def markdown(summary: dict[str, dict[int, dict[str, Any]]], labels: dict[str, str]) -> str:
    """Table: one row per method, one column per view count, cells ``PSNR / SSIM / s``.

    The 720-view FBP is the last row, alone in the last column.
    """
    views = sorted({v for by_views in summary.values() for v in by_views if v != REFERENCE_VIEWS})
    reference = summary.get("FBP", {}).get(REFERENCE_VIEWS)
    columns = [*views, REFERENCE_VIEWS] if reference is not None else views
    head = "| method | " + " | ".join(f"{v} views" for v in columns) + " |"
    lines = [head, "|---" * (len(columns) + 1) + "|"]

    def cell(entry: dict[str, Any] | None) -> str:
        if entry is None:
            return "-"
        return f"{entry['psnr_db']:.2f} / {entry['ssim']:.4f} / {entry['seconds_per_slice']:.2f} s"

    for method in METHODS:
        if method not in summary:
            continue
        cells = [cell(summary[method].get(v)) for v in views]
        if reference is not None:
            cells.append("-")
        lines.append(f"| {labels.get(method, method)} | " + " | ".join(cells) + " |")
    if reference is not None:
        cells = ["-"] * len(views) + [cell(reference)]
        lines.append(f"| FBP, {REFERENCE_VIEWS} views (reference) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The command-line options (see the module docstring)."""
    parser = argparse.ArgumentParser(
        prog="recon_quality", description=__doc__.splitlines()[0] if __doc__ else None
    )
    parser.add_argument("--data", type=Path, default=DATA, help="shared data folder")
    parser.add_argument("--patients", type=int, default=8, help="validation patients")
    parser.add_argument("--slices", type=int, default=2, help="slices per patient")
    parser.add_argument("--skip-patients", type=int, default=0, help="start after this many")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--slice-stride", type=int, default=2)
    parser.add_argument("--views", type=int, nargs="+", default=list(VIEWS))
    parser.add_argument("--i0", type=float, default=1e5, help="photons per bin and view")
    parser.add_argument("--seed", type=int, default=12345, help="base noise seed")
    parser.add_argument("--sirt-iterations", type=int, default=DEFAULT_ITERATIONS["sirt"])
    parser.add_argument("--cgls-iterations", type=int, default=DEFAULT_ITERATIONS["cgls"])
    parser.add_argument("--tv-iterations", type=int, default=DEFAULT_ITERATIONS["tv"])
    parser.add_argument(
        "--tv-weight", type=float, default=SparseViewCTParams.model_fields["tv_weight"].default
    )
    parser.add_argument(
        "--dc-iterations",
        type=int,
        default=DC_ITERATIONS,
        help="data-consistency iterations of learned (0: learned is the network output)",
    )
    parser.add_argument("--dc-tv-weight", type=float, default=DC_DEFAULTS["tv_weight"])
    parser.add_argument("--dc-anchor-weight", type=float, default=DC_DEFAULTS["anchor_weight"])
    parser.add_argument(
        "--tv-weak-iterations",
        type=int,
        default=2 * DC_ITERATIONS,
        help="TV from zero with --dc-tv-weight (the fair classical twin of learned; 0: skip)",
    )
    parser.add_argument(
        "--learned-weights",
        type=Path,
        default=None,
        help="GloReDiNet state dict (fp16/fp32); default: the registered weights, if any",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    return parser


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, print the header, table and target lines; return the figures."""
    args = build_parser().parse_args(argv)
    if args.patients < 1 or args.slices < 1 or any(v < 4 for v in args.views):
        raise SystemExit("need --patients >= 1, --slices >= 1 and views >= 4")
    torch.set_num_threads(args.threads)
    weights = args.learned_weights if args.learned_weights is not None else registered_weights()
    net = None
    if weights is not None:
        from models.pipelines.sparse_view_ct.learned import load_network

        net = load_network(weights)
    cases = load_cases(
        args.data,
        args.patients,
        args.slices,
        args.image_size,
        args.slice_stride,
        args.skip_patients,
    )
    if not cases:
        raise SystemExit(f"no OpenKBP validation slices under {args.data}")
    iterations = {
        "sirt": args.sirt_iterations,
        "cgls": args.cgls_iterations,
        "tv": args.tv_iterations,
    }
    learned = SparseViewCTParams(
        method="learned",
        data_consistency="tv" if args.dc_iterations else "none",
        dc_iterations=max(args.dc_iterations, 1),
        dc_tv_weight=args.dc_tv_weight,
        dc_anchor_weight=args.dc_anchor_weight,
    )
    n_slices = sum(int(c.slices_hu.shape[0]) for c in cases)
    print("## Reconstruction quality (simulated sparse-view fan-beam scans of real CT)")
    print(
        f"held-out OpenKBP validation patients {[c.case_id.split('/')[-1] for c in cases]}, "
        f"{n_slices} slices {args.image_size}x{args.image_size} "
        f"({', '.join(f'{c.pixel_size_mm:.2f}' for c in cases)} mm pixels)"
    )
    print(
        f"scanner: 360 deg equiangular fan beam (training simulator), Poisson I0 {args.i0:g} per "
        f"bin and view, noise seed {args.seed} + 1000 patient + views"
    )
    print(
        f"metrics vs the real slice: PSNR / SSIM in the body mask (largest region > "
        f"{BODY_THRESHOLD_HU:g} HU, holes filled), HU window [{HU_WINDOW[0]:g}, {HU_WINDOW[1]:g}] "
        f"(data range {HU_WINDOW[1] - HU_WINDOW[0]:g} HU), mean over slices; seconds per slice, "
        f"{args.threads} torch thread(s), load average {os.getloadavg()[0]:.2f}"
    )
    if net is None:
        print("learned: no weights (no --learned-weights and none registered): column skipped")
    else:
        print(f"learned: {weights} (trained at 18/36/60 views; 90 views is outside that)")
    print(flush=True)
    labels = {
        "FBP": "FBP (ram-lak)",
        "SIRT": f"SIRT {iterations['sirt']} it, x >= 0",
        "CGLS": f"CGLS {iterations['cgls']} it",
        "TV": f"TV {iterations['tv']} it, weight {args.tv_weight:g}, x >= 0",
        "TV weak": f"TV {args.tv_weak_iterations} it, weight {args.dc_tv_weight:g}, x >= 0",
        "network": "network alone (GloReDiNet on FBP)",
        "learned": (
            f"**learned** (pipeline: network, then {args.dc_iterations} it of TV weight "
            f"{args.dc_tv_weight:g} anchored to it, weight {args.dc_anchor_weight:g})"
            if args.dc_iterations
            else "**learned** (pipeline with data_consistency none: the network output)"
        ),
    }

    def figures(done: int, scores: dict[str, dict[int, list[Score]]]) -> dict[str, Any]:
        summary = summarise(scores)
        return {
            "complete": done == len(cases),
            "patients_done": done,
            "data": [
                {
                    "case": c.case_id,
                    "slices": int(c.slices_hu.shape[0]),
                    "pixel_mm": c.pixel_size_mm,
                }
                for c in cases[:done]
            ],
            "settings": {
                k: (str(v) if isinstance(v, Path) else v)
                for k, v in vars(args).items()
                if k != "json"
            },
            "learned_weights": None if weights is None else str(weights),
            "metric": {
                "mask": f"body of the target: largest region > {BODY_THRESHOLD_HU:g} HU, "
                "holes filled",
                "window_hu": list(HU_WINDOW),
                "reference": "the real slice",
            },
            "labels": labels,
            "summary": {m: {str(v): e for v, e in by.items()} for m, by in summary.items()},
            "per_slice": {
                m: {
                    str(v): [[_finite(s.psnr_db), _finite(s.ssim), s.seconds] for s in rows]
                    for v, rows in by.items()
                }
                for m, by in scores.items()
            },
            "targets": target_checks(summary),
        }

    def save(done: int, scores: dict[str, dict[int, list[Score]]]) -> None:
        if args.json is not None:  # after every patient, so a stopped run leaves its figures
            tmp = args.json.with_name(args.json.name + ".tmp")
            tmp.write_text(json.dumps(figures(done, scores), indent=1))
            os.replace(tmp, args.json)

    scores = evaluate(
        cases,
        args.views,
        iterations=iterations,
        tv_weight=args.tv_weight,
        i0=args.i0,
        seed=args.seed,
        net=net,
        learned=learned,
        tv_weak=(args.tv_weak_iterations, args.dc_tv_weight),
        after_case=save,
    )
    result = figures(len(cases), scores)
    summary = summarise(scores)
    print("\nCells: PSNR dB / SSIM / seconds per slice.\n")
    print(markdown(summary, labels))
    print("\nTargets (issue 5):")
    for check in result["targets"]:
        print(f"  {check['target']}: {check['text']}")
    sys.stdout.flush()
    return result


if __name__ == "__main__":
    main()
