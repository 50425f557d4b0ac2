"""``voxelgate train sparse-view-ct``: the command line of the GloReDi-style training.

Only the arguments live here; the training itself is :mod:`workers.train_sparse_view`, imported
inside the command, so the gateway side stays free of the compute stack.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from models.pipelines.segment.card import TRAINABLE_ARCHITECTURES

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def cmd_train_sparse_view(args: argparse.Namespace) -> int:
    """Train (or resume) and write checkpoint, fp16 weights, sha256 and metrics."""
    from workers.train_sparse_view import run

    return run(args)


def cmd_train_segment(args: argparse.Namespace) -> int:
    """Train (or resume) a segmentation network and write an installable model folder."""
    from workers.train_segment import run

    return run(args)


def cmd_train_sct(args: argparse.Namespace) -> int:
    """Train (or resume) the CBCT -> sCT network on simulated CBCT / real CT pairs."""
    from workers.train_sct import run

    return run(args)


def _add_sct(tsub: Any) -> None:
    from workers.train_sct import add_arguments

    p = tsub.add_parser(
        "cbct-to-sct", help="GLFC-style (or plain UNet) CBCT -> synthetic CT on simulated pairs"
    )
    add_arguments(p)
    p.set_defaults(func=cmd_train_sct)


def _add_segment(tsub: Any) -> None:
    p = tsub.add_parser("segment", help="3D U-Net / UNet++ segmentation on MSD-layout data")
    p.add_argument("--data", required=True, help="MSD folder (dataset.json) or a dataset JSON")
    p.add_argument("--out", required=True, help="output folder (checkpoint, metrics, model)")
    p.add_argument("--arch", default="unet3d", choices=TRAINABLE_ARCHITECTURES)
    p.add_argument("--net-args", default="", help="network arguments as JSON (card args)")
    p.add_argument("--name", default="segment-model", help="model folder / card name")
    p.add_argument("--version", default="0.1.0")
    p.add_argument("--modality", default="CT")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--patch", type=int, nargs=3, default=[96, 96, 96], metavar="N")
    p.add_argument(
        "--spacing", type=float, nargs=3, default=None, metavar="MM", help="default: median"
    )
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--elastic", type=float, default=0.2, help="elastic deformation probability")
    p.add_argument("--foreground", type=float, default=1 / 3, help="foreground patch share")
    p.add_argument(
        "--balanced-foreground",
        action="store_true",
        help="foreground patches centred on a label drawn uniformly among the case's labels",
    )
    p.add_argument("--flip-axes", type=int, nargs="*", default=[0, 1, 2], metavar="AXIS")
    p.add_argument(
        "--mirror-pairs",
        nargs="*",
        default=[],
        metavar="A:B",
        help="labels swapped by a left-right flip (e.g. 3:4 right/left parotid)",
    )
    p.add_argument("--no-rot90", action="store_true", help="no in-plane 90 degree rotations")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument(
        "--val-cases", type=int, default=1, help="last K cases held out (no 'validation' list)"
    )
    p.add_argument("--validate-every", type=int, default=0)
    p.add_argument("--checkpoint-every", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from DIR/checkpoint.pt")
    p.add_argument(
        "--init-weights",
        default=None,
        metavar="FILE",
        help="start a new run from these weights (a model.pt or checkpoint), not --resume",
    )
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--quiet", "-q", action="store_true")
    p.set_defaults(func=cmd_train_segment)


def cmd_dataset_openkbp(args: argparse.Namespace) -> int:
    """Write the OpenKBP dataset JSON (official splits, QC flags out, present organs)."""
    import json

    from workers.openkbp_dataset import run

    print(json.dumps(run(Path(args.src), Path(args.out))))
    return 0


def cmd_dataset_cbct_pairs(args: argparse.Namespace) -> int:
    """Simulate CBCT from each OpenKBP CT and write the pair dataset (resumable)."""
    import json

    from workers.cbct_pairs import build_pairs

    dataset = build_pairs(
        Path(args.src),
        Path(args.out),
        projections=args.projections,
        jobs=args.jobs,
        threads=args.threads,
        limit=args.limit,
        splits=tuple(args.splits.split(",")),
        log=None if args.quiet else print,
    )
    print(json.dumps({k: len(dataset[k]) for k in ("training", "validation", "excluded")}))
    return 0


def cmd_dataset_hu_reference(args: argparse.Namespace) -> int:
    """Write the body-voxel HU quantile table of ``cbct-to-sct`` hu-calibration."""
    import json

    from workers.hu_reference import run

    summary = run(
        Path(args.src),
        Path(args.out),
        threshold_hu=args.threshold,
        limit=args.limit,
        log=None if args.quiet else print,
    )
    print(json.dumps(summary))
    return 0


def add_dataset_commands(sub: Any) -> None:
    """Register ``dataset openkbp``, ``cbct-pairs`` and ``hu-reference`` (../shared/data)."""
    p_ds = sub.add_parser("dataset", help="write a training dataset description")
    dsub = p_ds.add_subparsers(dest="dataset", required=True)
    p = dsub.add_parser("openkbp", help="OpenKBP head-and-neck OARs -> segment dataset JSON")
    p.add_argument("--src", default=str(DEFAULT_DATA / "openkbp"), help="OpenKBP folder")
    p.add_argument("--out", required=True, help="dataset JSON to write")
    p.set_defaults(func=cmd_dataset_openkbp)
    p = dsub.add_parser(
        "cbct-pairs", help="simulated CBCT / real CT pairs from OpenKBP (cbct-to-sct training)"
    )
    p.add_argument("--src", default=str(DEFAULT_DATA / "openkbp"), help="OpenKBP folder")
    p.add_argument("--out", required=True, help="output folder (pairs + dataset.json)")
    p.add_argument("--projections", type=int, default=180, help="projections per scan")
    p.add_argument("--jobs", type=int, default=1, help="simulation processes")
    p.add_argument("--threads", type=int, default=1, help="ITK threads per process")
    p.add_argument("--limit", type=int, default=0, help="first K cases per split (0: all)")
    p.add_argument(
        "--splits", default="training,validation", help="splits to simulate, in this order"
    )
    p.add_argument("--quiet", "-q", action="store_true")
    p.set_defaults(func=cmd_dataset_cbct_pairs)
    p = dsub.add_parser(
        "hu-reference",
        help="body HU quantiles of the OpenKBP training CTs (cbct-to-sct hu-calibration)",
    )
    p.add_argument("--src", default=str(DEFAULT_DATA / "openkbp"), help="OpenKBP folder")
    p.add_argument(
        "--out",
        required=True,
        help="JSON to write (shipped as models/weights/cbct_to_sct/hu_reference.json)",
    )
    p.add_argument("--threshold", type=float, default=-500.0, help="body threshold, HU")
    p.add_argument("--limit", type=int, default=0, help="first K training cases (0: all)")
    p.add_argument("--quiet", "-q", action="store_true")
    p.set_defaults(func=cmd_dataset_hu_reference)


def add_train_commands(sub: Any) -> None:
    """Register ``train sparse-view-ct`` and ``train segment`` on the top-level subparsers."""
    p_train = sub.add_parser("train", help="train a learned pipeline's network")
    tsub = p_train.add_subparsers(dest="model", required=True)
    p = tsub.add_parser("sparse-view-ct", help="GloReDi-style sparse-view CT post-processing")
    p.add_argument("--out", required=True, help="output folder (checkpoint, weights, metrics)")
    p.add_argument("--steps", type=int, default=6000)
    p.add_argument("--resume", action="store_true", help="continue from DIR/checkpoint.pt")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--crop", type=int, default=96)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument(
        "--air-weight", type=float, default=0.1, help="L1 weight outside the body (inside: 1)"
    )
    p.add_argument("--lr-schedule", default="cosine", choices=["cosine", "constant"])
    p.add_argument("--checkpoint-every", type=int, default=100)
    p.add_argument("--validate-every", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--features", type=int, default=32)
    p.add_argument("--views", type=int, nargs="+", default=[18, 36, 60])
    p.add_argument("--i0", type=float, default=1e5, help="photons per bin and view")
    p.add_argument("--image-size", type=int, default=128, help="slices resampled to this side")
    p.add_argument("--slice-stride", type=int, default=2)
    p.add_argument("--train-cases", type=int, default=0, help="first K training patients (0 all)")
    p.add_argument("--val-cases", type=int, default=8)
    p.add_argument("--val-slices", type=int, default=2, help="slices per validation patient")
    p.add_argument("--no-extra", action="store_true", help="openkbp only")
    p.add_argument("--data", default=str(DEFAULT_DATA), help="shared data folder")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--quiet", "-q", action="store_true")
    p.set_defaults(func=cmd_train_sparse_view)
    _add_segment(tsub)
    _add_sct(tsub)
