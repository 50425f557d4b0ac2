"""The work of ``voxelgate train cbct-to-sct``: train the sCT network on simulated CBCT pairs.

Data: the folder written by ``voxelgate dataset cbct-pairs`` (``dataset.json`` with
``training`` and ``validation`` lists of ``{"case", "ct", "cbct", "fov"}`` NIfTI paths; split by
patient). Each pair is read with :func:`service.io.nifti.read_nifti` and reoriented to the
network's canonical frame (:data:`models.training.sct_data.CANONICAL`, permutation and flips
only, no resampling; the training grids are kept). The first ``--val-cases`` validation
patients select the best state; the remaining validation patients stay untouched for
``benchmarks/sct.py``.

``--out DIR`` receives ``checkpoint.pt`` (``--resume`` continues from it), ``metrics.json``
(history, best validation), ``model.pt`` (best state, fp16, with its network config, the
training spacing range and facts) and ``model.pt.sha256``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from service.errors import InvalidParameters
from workers.training_files import atomic_json, atomic_torch_save, checkpoint_path, save_weights

VAL_CASES = 8
"""Validation patients used for model selection (the first ones of the validation list)."""


def read_dataset(path: Path) -> dict[str, Any]:
    """The pair dataset dict (``dataset.json`` in a folder, or the JSON file itself)."""
    file = path / "dataset.json" if path.is_dir() else path
    try:
        dataset: dict[str, Any] = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise InvalidParameters(f"cannot read the pair dataset {file}: {exc}") from None
    if not dataset.get("training"):
        raise InvalidParameters(f"{file} lists no training pairs")
    return dataset


def load_case(entry: dict[str, Any]) -> tuple[Any, tuple[float, float, float]]:
    """Read one pair as an :class:`~models.training.sct_data.SCTCase`; also its spacing (mm).

    Raises:
        InvalidParameters: CT and CBCT grids differ.
    """
    from models.pipelines.segment.geometry import reorientation
    from models.training.sct_data import CANONICAL, SCTCase
    from service.io.nifti import read_nifti

    ct, cbct, fov = (read_nifti(Path(entry[key])) for key in ("ct", "cbct", "fov"))
    if not (np.allclose(ct.affine, cbct.affine, atol=1e-3) and ct.array.shape == cbct.array.shape):
        raise InvalidParameters(f"case {entry['case']}: CT and CBCT are not on the same grid")
    reorient = reorientation(ct.affine, CANONICAL)
    spacing = np.linalg.norm(ct.affine[:3, :3], axis=0)[list(reorient.perm)]
    arrays = [np.ascontiguousarray(reorient.apply(np.asarray(v.array))) for v in (cbct, ct, fov)]
    case = SCTCase(
        name=str(entry["case"]),
        cbct=arrays[0].astype(np.int16),
        ct=np.clip(arrays[1], -1024, 3071).astype(np.int16),
        fov=arrays[2] > 0,
    )
    return case, (float(spacing[0]), float(spacing[1]), float(spacing[2]))


def spacing_range(spacings: list[tuple[float, float, float]]) -> dict[str, list[float]]:
    """``{"slice": [min, max], "in_plane": [min, max]}`` (mm) over the training cases."""
    arr = np.asarray(spacings)
    return {
        "slice": [round(float(arr[:, 0].min()), 4), round(float(arr[:, 0].max()), 4)],
        "in_plane": [round(float(arr[:, 1:].min()), 4), round(float(arr[:, 1:].max()), 4)],
    }


def run(args: argparse.Namespace) -> int:
    """Train; write checkpoint, metrics and weights under ``--out``."""
    import torch

    from models.pipelines.cbct_to_sct.learned import weights_record
    from models.training.sct_train import SCTTrainConfig, train

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    checkpoint = checkpoint_path(out, args.resume)
    dataset = read_dataset(Path(args.data))
    entries = dataset["training"][: args.train_cases] if args.train_cases else dataset["training"]
    loaded = [load_case(e) for e in entries]
    cases = [c for c, _ in loaded]
    val_entries = dataset.get("validation", [])[: args.val_cases]
    val_cases = [load_case(e)[0] for e in val_entries]
    config = SCTTrainConfig(
        arch=args.arch,
        steps=args.steps,
        batch=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        validate_every=args.validate_every,
        checkpoint_every=args.checkpoint_every,
        precision=args.precision,
    )
    resume = torch.load(checkpoint, map_location="cpu", weights_only=True) if args.resume else None

    def log(record: dict[str, Any]) -> None:
        if not args.quiet:
            print(json.dumps(record), file=sys.stderr, flush=True)

    outcome = train(
        config,
        cases,
        val_cases,
        resume_state=resume,
        save=lambda state: atomic_torch_save(state, checkpoint),
        log=log,
        device=args.device,
    )
    state = outcome.state
    best_model = state["best_model"] if state["best_model"] is not None else state["model"]
    training = {
        "data": dataset.get("description", ""),
        "simulated_input": bool(dataset.get("simulated_input", True)),
        "training_cases": [c.name for c in cases],
        "validation_cases": [c.name for c in val_cases],
        "steps": config.steps,
        "config": config.to_json(),
        "best": {k: v for k, v in outcome.best.items() if k != "cases"},
        "parameters": state["parameters"],
        "scan_backend": state["scan_backend"],
    }
    weights = out / "model.pt"
    record = weights_record(
        state["network"], best_model, spacing_range([s for _, s in loaded]), training
    )
    digest = save_weights(record, weights)
    atomic_json(
        {"training": training, "best": outcome.best, "history": outcome.history, "sha256": digest},
        out / "metrics.json",
    )
    print(json.dumps({"weights": str(weights), "sha256": digest, "best": training["best"]}))
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``voxelgate train cbct-to-sct``."""
    p.add_argument("--data", required=True, help="folder of 'voxelgate dataset cbct-pairs'")
    p.add_argument("--out", required=True, help="output folder (checkpoint, weights, metrics)")
    p.add_argument("--arch", default="glfc", choices=["glfc", "unet", "unet3d"])
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--validate-every", type=int, default=250)
    p.add_argument("--checkpoint-every", type=int, default=50)
    p.add_argument("--train-cases", type=int, default=0, help="first K training pairs (0: all)")
    p.add_argument("--val-cases", type=int, default=VAL_CASES, help="validation patients used")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--resume", action="store_true", help="continue from DIR/checkpoint.pt")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--quiet", "-q", action="store_true")
