"""The work of ``voxelgate train sparse-view-ct``: train the GloReDi-style network.

Reads real CT from the shared data folder (openkbp patients split by its ``splits.json``:
training patients for training, validation patients held out for the validation PSNR; the
TotalSegmentator example CT and the CIL head CT join the training set unless ``--no-extra``),
simulates fan-beam sparse views (see :mod:`models.training.sparse_view_data`) and trains.

``--out DIR`` receives ``checkpoint.pt`` (weights, optimizer state, step: ``--resume``
continues from it), and at the end ``gloredi_sparse_view_fp16.pt`` (fp16 state dict), its
``.sha256`` and ``metrics.json`` (every figure in it was measured by this run). Thin glue
between the CLI's arguments (:mod:`service.cli_train`, torch-free) and
:mod:`models.training`; torch is imported here, never in ``service``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from service.errors import InvalidParameters
from workers.training_files import atomic_json, atomic_torch_save, checkpoint_path, save_weights

WEIGHTS = "gloredi_sparse_view_fp16.pt"
DATA_ARGS = ("image_size", "slice_stride", "train_cases", "val_cases", "val_slices", "no_extra")
"""Data options a resumed run must repeat (they decide which slices it trains and validates on)."""


def _lps_volume(path: Path) -> tuple[Any, float]:
    """A NIfTI/MHA CT as an ``(X, Y, Z)`` HU array with axes L, P, S, and its in-plane spacing."""
    import nibabel as nib
    import numpy as np

    if path.suffix == ".mha":
        import SimpleITK as sitk  # noqa: N813

        image = sitk.DICOMOrient(sitk.ReadImage(str(path)), "LPS")
        array = np.transpose(sitk.GetArrayFromImage(image), (2, 1, 0)).astype(np.float32)
        spacing = image.GetSpacing()
        if abs(spacing[0] - spacing[1]) > 0.01 * spacing[0]:
            raise InvalidParameters(f"{path}: in-plane spacing {spacing[:2]} is not square")
        return array, float(spacing[0])
    img: Any = nib.load(path)
    target = nib.orientations.axcodes2ornt(("L", "P", "S"))
    transform = nib.orientations.ornt_transform(nib.orientations.io_orientation(img.affine), target)
    array = nib.orientations.apply_orientation(np.asarray(img.dataobj, dtype=np.float32), transform)
    zooms = nib.affines.voxel_sizes(img.affine)
    lps_zooms = [float(zooms[int(axis)]) for axis in transform[:, 0].argsort()]
    if abs(lps_zooms[0] - lps_zooms[1]) > 0.01 * lps_zooms[0]:
        raise InvalidParameters(f"{path}: in-plane spacing {lps_zooms[:2]} is not square")
    return array, lps_zooms[0]


def _load_cases(names: list[tuple[str, Path]], args: argparse.Namespace) -> list[Any]:
    from models.training.sparse_view_data import CTCase, axial_slices

    cases = []
    for case_id, path in names:
        if not path.exists():
            raise InvalidParameters(f"missing CT {path}")
        volume, pixel = _lps_volume(path)
        slices, out_pixel = axial_slices(volume, pixel, args.image_size, args.slice_stride)
        if slices.shape[0]:
            cases.append(CTCase(case_id, slices, out_pixel))
    return cases


def _data(args: argparse.Namespace) -> tuple[list[Any], list[Any], dict[str, Any]]:
    from models.training.sparse_view_data import openkbp_split

    if args.train_cases < 0 or args.val_cases < 1 or args.val_slices < 1 or args.slice_stride < 1:
        raise InvalidParameters(
            "need --train-cases >= 0, --val-cases, --val-slices, --slice-stride >= 1"
        )
    if not 16 <= args.image_size <= 512:
        raise InvalidParameters(f"--image-size must be in 16..512, got {args.image_size}")
    root = Path(args.data)
    kbp = root / "openkbp"
    splits_path = kbp / "splits.json"
    if not splits_path.exists():
        raise InvalidParameters(f"no openkbp splits at {splits_path} (use --data)")
    train_ids, val_ids = openkbp_split(json.loads(splits_path.read_text()))
    if args.train_cases:
        train_ids = train_ids[: args.train_cases]
    val_ids = val_ids[: args.val_cases]
    train_names = [(f"openkbp/{c}", kbp / c / "ct.nii.gz") for c in train_ids]
    if not args.no_extra:
        train_names += [
            ("totalsegmentator/example_ct", root / "totalsegmentator" / "example_ct.nii.gz"),
            ("cil-head/head", root / "cil-head" / "head.mha"),
        ]
    train = _load_cases(train_names, args)
    val = _load_cases([(f"openkbp/{c}", kbp / c / "ct.nii.gz") for c in val_ids], args)
    if not train or not val:
        raise InvalidParameters("need at least one training and one validation case")
    summary = {
        "train_cases": [c.case_id for c in train],
        "validation_cases": [c.case_id for c in val],
        "train_slices": sum(int(c.slices_hu.shape[0]) for c in train),
        "split": "openkbp splits.json (patient level; QC-flagged patients excluded)",
        "simulated": "fan-beam sparse views with Poisson noise from real CT slices",
    }
    return train, val, summary


def _config(args: argparse.Namespace) -> Any:
    from models.training.sparse_view_train import TrainConfig

    return TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        crop=args.crop,
        lr=args.lr,
        lr_schedule=args.lr_schedule,
        air_weight=args.air_weight,
        checkpoint_every=args.checkpoint_every,
        validate_every=args.validate_every,
        seed=args.seed,
        features=args.features,
        views=tuple(args.views),
        i0=args.i0,
        device=args.device,
    )


def run(args: argparse.Namespace) -> int:
    """Train (or resume) and write checkpoint, fp16 weights, sha256 and metrics."""
    import torch
    from tqdm import tqdm

    from models.errors import InputRejected
    from models.training.checkpoints import compact_checkpoint
    from models.training.sparse_view_data import (
        SimulationConfig,
        SparseViewSimulator,
        make_validation_set,
    )
    from models.training.sparse_view_train import fp16_state_dict, train

    out = Path(args.out)
    checkpoint = checkpoint_path(out, args.resume)
    data_args = {k: getattr(args, k) for k in DATA_ARGS}
    try:
        config = _config(args)
        resume = (
            torch.load(checkpoint, map_location="cpu", weights_only=True) if args.resume else None
        )
        if resume is not None and resume.get("data_args", data_args) != data_args:
            raise InvalidParameters(
                f"checkpoint was trained on data {resume['data_args']}, this run asks "
                f"{data_args}; use the same data options to resume"
            )
        train_cases, val_cases, data_summary = _data(args)
        sim = SparseViewSimulator(SimulationConfig(config.views, config.teacher_factor, config.i0))
        val = make_validation_set(val_cases, sim, args.val_slices)
        with tqdm(total=config.steps, disable=args.quiet, file=sys.stderr, unit="step") as bar:
            if resume is not None:
                bar.update(int(resume["step"]))

            def progress(step: int, steps: int, parts: dict[str, float]) -> None:
                bar.update(1)
                bar.set_postfix(loss=f"{parts['loss']:.4f}")

            outcome = train(
                config,
                train_cases,
                val,
                resume_state=resume,
                save_checkpoint=lambda state: atomic_torch_save(
                    {**compact_checkpoint(state), "data_args": data_args}, checkpoint
                ),
                progress=progress,
            )
    except InputRejected as exc:
        raise InvalidParameters(str(exc)) from exc
    weights = out / WEIGHTS
    digest = save_weights(fp16_state_dict(outcome.model), weights)
    metrics = {
        "model": "GloReDiNet (GloReDi-inspired; not the paper's weights or exact recipe)",
        "weights": WEIGHTS,
        "weights_sha256": digest,
        "weights_bytes": weights.stat().st_size,
        "config": outcome.state["config"],
        "data": {**data_summary, "options": data_args},
        "validation_metric": "mean PSNR in the body mask, HU window [-1000, 1000], vs the real "
        "slice (simulated inputs)",
        **outcome.metrics,
    }
    atomic_json(metrics, out / "metrics.json")
    print(
        json.dumps(
            {
                "out": str(out),
                "steps": metrics["steps_total"],
                "validation": metrics.get("validation"),
                "weights_sha256": digest,
            },
            indent=2,
        )
    )
    return 0
