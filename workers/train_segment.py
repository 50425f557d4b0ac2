"""The work of ``voxelgate train segment``: train a 3D U-Net / UNet++ on user data.

Data: a Medical Segmentation Decathlon folder (``dataset.json`` with ``labels`` and a
``training`` list of ``{"image", "label"}`` paths relative to the folder, usually
``imagesTr/``/``labelsTr/``), or a JSON file of the same form (a list of image/label pairs).
Optional per-case keys extend the MSD format: ``"case"`` (its name; default the image file
name without extension), ``"present": [1, 3]`` (labels annotated in
that case; the others were not contoured and are not treated as background) and the label value
255 anywhere marks unlabelled voxels (sparse annotation). A top-level ``"validation"`` list of
the same form names the held-out cases explicitly (an official split); without it the last
``--val-cases`` training cases (sorted by name) are held out.

Each case is read with :func:`service.io.nifti.read_nifti`, reoriented to the card's canonical
frame (RAS) exactly as the ``segment`` pipeline does (axis permutation/flips only), normalised
(:func:`~models.pipelines.segment.inference.normalise`) and resampled to the training spacing
(image trilinear with voxel edges aligned, as the pipeline; labels nearest neighbour, never
interpolated). The training spacing (median) and the CT intensity window are taken from the
training cases only.

``--out DIR`` receives ``checkpoint.pt`` (``--resume`` continues from it), ``metrics.json``
and the installable model folder ``DIR/<name>/`` (``card.json`` + ``model.pt`` + its sha256,
and a compact ``checkpoint.pt`` to resume from in a later session), which can be copied to
``models/weights/segment/<name>/``. Every figure in the card and the
metrics was measured by this run.
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

WEIGHTS = "model.pt"
SHIPPED_CHECKPOINT = "checkpoint.pt"
"""The compact resume checkpoint written into the model folder (weights and AdamW moments as
bfloat16): copy it to ``DIR/checkpoint.pt`` and pass ``--resume`` to continue in a later
session."""
ORIENTATION = "RAS"
DEFAULT_NET_ARGS: dict[str, dict[str, Any]] = {
    "unet3d": {"channels": [16, 32, 64, 128], "strides": [2, 2, 2], "num_res_units": 2},
    "unetpp": {"features": [16, 16, 32, 64, 128, 16]},
    "dynunet": {
        "kernel_size": [3, 3, 3, 3, 3],
        "strides": [1, 2, 2, 2, 2],
        "upsample_kernel_size": [2, 2, 2, 2],
        "filters": [16, 32, 64, 128, 256],
        "norm_name": "instance",
        "res_block": True,
    },
}


def _read_dataset(data: Path) -> tuple[Path, dict[str, Any]]:
    path = data / "dataset.json" if data.is_dir() else data
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise InvalidParameters(f"cannot read {path}: {exc}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("training"), list):
        raise InvalidParameters(f"{path}: needs a 'training' list of image/label pairs")
    if not isinstance(meta.get("labels"), dict):
        raise InvalidParameters(f"{path}: needs 'labels' {{'0': 'background', '1': ...}}")
    return path.parent, meta


def _labels(meta: dict[str, Any]) -> list[tuple[int, str]]:
    try:
        labels = sorted((int(k), str(v)) for k, v in meta["labels"].items() if int(k) != 0)
    except ValueError:
        raise InvalidParameters("dataset.json labels keys must be integers") from None
    if [v for v, _ in labels] != list(range(1, len(labels) + 1)) or not labels:
        raise InvalidParameters(f"dataset.json labels must be 0..n, got {meta['labels']}")
    return labels


def _canonical(path: Path) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    from models.pipelines.segment.geometry import reorientation
    from service.io.nifti import read_nifti

    vol = read_nifti(path)
    reo = reorientation(vol.affine, ORIENTATION)
    affine = reo.affine(vol.affine, vol.shape)
    spacing = tuple(float(s) for s in np.linalg.norm(affine[:3, :3], axis=0))
    return reo.apply(vol.array), affine, (spacing[0], spacing[1], spacing[2])


def _nearest(label: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """Labels to ``shape``, nearest (edges aligned): voxel ``m`` takes ``floor((m+.5)n/n')``."""
    idx = [
        np.minimum(((np.arange(m) + 0.5) * n / m).astype(int), n - 1)
        for m, n in zip(shape, label.shape, strict=True)
    ]
    return label[np.ix_(*idx)]


def _load_cases(root: Path, entries: list[Any], n_labels: int) -> list[dict[str, Any]]:
    """Read, reorient and check each ``{"image", "label", "present"?}`` entry (sorted by name)."""
    from models.training.segment_data import validate_label

    raw = []
    for n, entry in enumerate(entries):
        if not isinstance(entry, dict) or "image" not in entry or "label" not in entry:
            raise InvalidParameters(f"training entry {n} needs 'image' and 'label'")
        image, affine, sp = _canonical(root / entry["image"])
        label, l_affine, _ = _canonical(root / entry["label"])
        case_id = str(entry.get("case") or Path(entry["image"]).name.split(".")[0])
        if image.shape != label.shape or not np.allclose(affine, l_affine, atol=1e-3):
            raise InvalidParameters(
                f"{case_id}: image and label grids differ (shape {image.shape} vs "
                f"{label.shape} or affine); labels are never resampled silently"
            )
        present = entry.get("present")
        if present is not None and not all(1 <= int(v) <= n_labels for v in present):
            raise InvalidParameters(f"{case_id}: 'present' {present} outside 1..{n_labels}")
        raw.append(
            {
                "case_id": case_id,
                "image": image.astype(np.float32),
                "label": validate_label(label, n_labels, case_id),
                "spacing": sp,
                "present": None if present is None else tuple(sorted(int(v) for v in present)),
            }
        )
    return sorted(raw, key=lambda c: c["case_id"])


def _split(
    root: Path, meta: dict[str, Any], n_labels: int, val_cases: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Training and validation cases: the dataset's ``validation`` list, or the last K."""
    train = _load_cases(root, meta["training"], n_labels)
    if not train:
        raise InvalidParameters("dataset has no training cases")
    if "validation" in meta:
        if not isinstance(meta["validation"], list):
            raise InvalidParameters("dataset 'validation' must be a list of image/label pairs")
        val = _load_cases(root, meta["validation"], n_labels)
        clash = {c["case_id"] for c in train} & {c["case_id"] for c in val}
        if clash:
            raise InvalidParameters(f"cases both in training and validation: {sorted(clash)[:5]}")
        return train, val
    if not 0 <= val_cases < len(train):
        raise InvalidParameters(f"--val-cases must be in 0..{len(train) - 1}")
    split = len(train) - val_cases
    return train[:split], train[split:]


def _median_spacing(raw: list[dict[str, Any]]) -> tuple[float, float, float]:
    med = np.median([c["spacing"] for c in raw], axis=0)
    return float(med[0]), float(med[1]), float(med[2])


def _intensity(raw: list[dict[str, Any]], modality: str) -> dict[str, Any]:
    """CT: window at the 0.5/99.5 percentiles of foreground voxels (nnU-Net); else z-score."""
    if modality.upper() != "CT":
        return {"kind": "zscore"}
    fg = np.concatenate([c["image"][(c["label"] > 0) & (c["label"] != 255)] for c in raw])
    if fg.size == 0:
        fg = np.concatenate([c["image"].ravel() for c in raw])
    lo, hi = (float(v) for v in np.percentile(fg, [0.5, 99.5]))
    return {"kind": "window", "lower": lo, "upper": hi if hi > lo else lo + 1.0}


def _prepare(raw: dict[str, Any], spacing: tuple[float, float, float], intensity: Any) -> Any:
    from models.pipelines.segment.geometry import network_shape
    from models.pipelines.segment.inference import normalise, resample_image
    from models.training.segment_data import SegCase

    shape = network_shape(raw["image"].shape, raw["spacing"], spacing)
    image = resample_image(normalise(raw["image"], intensity), shape, "cpu")[0, 0].numpy()
    return SegCase(raw["case_id"], image, _nearest(raw["label"], shape), raw["present"])


def _config(args: argparse.Namespace, n_labels: int) -> Any:
    from models.training.segment_data import AugmentConfig
    from models.training.segment_train import SegTrainConfig

    net_args = json.loads(args.net_args) if args.net_args else DEFAULT_NET_ARGS[args.arch]
    return SegTrainConfig(
        arch=args.arch,
        net_args=net_args,
        n_labels=n_labels,
        patch=tuple(args.patch),
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        validate_every=args.validate_every,
        checkpoint_every=args.checkpoint_every,
        augment=AugmentConfig(
            elastic_probability=args.elastic,
            foreground_fraction=args.foreground,
            balanced_foreground=args.balanced_foreground,
            flip_axes=tuple(args.flip_axes),
            mirror_pairs=tuple(_pairs(args.mirror_pairs)),
            rot90=not args.no_rot90,
        ),
        device=args.device,
        precision=args.precision,
    )


def _pairs(specs: list[str]) -> list[tuple[int, int]]:
    """``["3:4"]`` -> ``[(3, 4)]``."""
    out = []
    for spec in specs:
        try:
            a, b = (int(v) for v in spec.split(":"))
        except ValueError:
            raise InvalidParameters(f"--mirror-pairs wants A:B label pairs, got {spec!r}") from None
        out.append((a, b))
    return out


def _card(
    args: argparse.Namespace, config: Any, labels: list[tuple[int, str]], **facts: Any
) -> dict[str, Any]:
    val = facts["validation"] or {}
    dice = val.get("dice", {})
    names = dict(labels)
    per = ", ".join(f"{names[int(v)]} {d:.3f}" for v, d in dice.items())
    return {
        "name": args.name,
        "version": args.version,
        "architecture": {"name": config.arch, "args": config.net_args},
        "weights": {"file": WEIGHTS, "sha256": facts["sha256"], "format": "state-dict"},
        "modality": args.modality,
        "spacing_mm": list(facts["spacing"]),
        "orientation": ORIENTATION,
        "intensity": facts["intensity"],
        "patch_size": list(config.patch),
        "labels": [_card_label(v, n, facts["label_codes"]) for v, n in labels],
        **_mirroring(config),
        "training_data": (
            f"{facts['dataset']}: {len(facts['train'])} training cases "
            f"({', '.join(facts['train'])}); held out for validation: "
            f"{', '.join(facts['val']) or 'none'}; resampled to {list(facts['spacing'])} mm, "
            f"{ORIENTATION}; {config.steps} steps of batch {config.batch_size}, patch "
            f"{list(config.patch)}, seed {config.seed}"
            + (
                f"; initialised from {facts['initialised_from']}"
                if facts["initialised_from"]
                else ""
            )
        ),
        "metrics": (
            f"validation Dice (hard, sliding window, network grid) at step "
            f"{facts['best_step']}: mean {val.get('mean_dice', float('nan')):.3f}; {per}"
            if val
            else "no validation cases: no metrics measured"
        ),
    }


def _mirroring(config: Any) -> dict[str, Any]:
    """The card's test-time mirroring: the flips the training augmentation used.

    Axis 0 of the RAS frame is left-right, where ``mirror_pairs`` were swapped; none without
    flips.
    """
    axes = sorted(config.augment.flip_axes) if config.augment.flip else []
    if not axes:
        return {}
    swap = [list(p) for p in config.augment.mirror_pairs] if 0 in axes else []
    return {"mirroring": {"axes": axes, "swap": swap}}


def _card_label(value: int, name: str, codes: Any) -> dict[str, Any]:
    """A card label, with the dataset's ``label_codes[value]`` (type, category, colour)."""
    entry: dict[str, Any] = {"value": value, "name": name}
    extra = codes.get(str(value), {}) if isinstance(codes, dict) else {}
    for key in ("category", "type", "colour"):
        if key in extra:
            entry[key] = list(extra[key])
    if "type" in entry and "category" not in entry:
        entry["category"] = ["123037004", "SCT", "Anatomical Structure"]
    return entry


def _initial_weights(path: str | None) -> Any:
    """``--init-weights``: a model's ``model.pt`` (any float dtype) or a training checkpoint."""
    if not path:
        return None
    from models.pipelines.segment.card import ModelCardInvalid
    from models.pipelines.segment.networks import read_state_dict
    from models.provenance import file_sha256
    from models.training.segment_train import InitialWeights

    file = Path(path)
    try:
        weights = read_state_dict(file)
    except ModelCardInvalid as exc:
        raise InvalidParameters(f"--init-weights {file.name}: {exc}") from None
    return InitialWeights(weights, f"{file.name} sha256 {file_sha256(file)}")


def run(args: argparse.Namespace) -> int:
    """Train (or resume), then write checkpoint, metrics and the installable model folder."""
    import torch
    from tqdm import tqdm

    from models.errors import InputRejected
    from models.pipelines.segment.card import Intensity, ModelCardInvalid, read_card
    from models.provenance import file_sha256
    from models.training.checkpoints import compact_checkpoint
    from models.training.segment_train import train

    out = Path(args.out)
    checkpoint = checkpoint_path(out, args.resume)
    root, meta = _read_dataset(Path(args.data))
    labels = _labels(meta)
    try:
        if not args.mirror_pairs and isinstance(meta.get("mirror_pairs"), list):
            args.mirror_pairs = [str(v) for v in meta["mirror_pairs"]]
        config = _config(args, len(labels))
        raw_train, raw_val = _split(root, meta, len(labels), args.val_cases)
        spacing = tuple(args.spacing) if args.spacing else _median_spacing(raw_train)
        intensity = Intensity.model_validate(_intensity(raw_train, args.modality))
        train_cases = [_prepare(c, spacing, intensity) for c in raw_train]
        val_cases = [_prepare(c, spacing, intensity) for c in raw_val]
        del raw_train, raw_val
        resume = (
            torch.load(checkpoint, map_location="cpu", weights_only=True) if args.resume else None
        )
        with tqdm(total=config.steps, disable=args.quiet, file=sys.stderr, unit="step") as bar:
            if resume is not None:
                bar.update(int(resume["step"]))

            def progress(step: int, steps: int, loss: float) -> None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}")

            outcome = train(
                config,
                train_cases,
                val_cases,
                resume_state=resume,
                initial=_initial_weights(args.init_weights),
                save_checkpoint=lambda state: atomic_torch_save(state, checkpoint),
                progress=progress,
            )
    except InputRejected as exc:
        raise InvalidParameters(str(exc)) from exc
    folder = out / args.name
    folder.mkdir(exist_ok=True)
    weights = folder / WEIGHTS
    digest = save_weights({k: v.cpu() for k, v in outcome.model.state_dict().items()}, weights)
    card = _card(
        args,
        config,
        labels,
        sha256=digest,
        spacing=spacing,
        intensity=intensity.model_dump(exclude_none=True),
        dataset=str(meta.get("name", Path(args.data).name)),
        train=[c.case_id for c in train_cases],
        val=[c.case_id for c in val_cases],
        validation=outcome.metrics["validation"],
        label_codes=meta.get("label_codes"),
        best_step=outcome.metrics["best_step"],
        initialised_from=outcome.metrics["initialised_from"],
    )
    atomic_json(card, folder / "card.json")
    shipped = folder / SHIPPED_CHECKPOINT
    atomic_torch_save(compact_checkpoint(outcome.state, weights_bf16=True), shipped)
    (folder / f"{SHIPPED_CHECKPOINT}.sha256").write_text(
        f"{file_sha256(shipped)}  {SHIPPED_CHECKPOINT}\n", encoding="utf-8"
    )
    try:
        read_card(folder)
    except ModelCardInvalid as exc:
        raise InvalidParameters(f"written card is invalid: {exc}") from exc
    metrics = {"card": card, "config": outcome.state["config"], **outcome.metrics}
    atomic_json(metrics, out / "metrics.json")
    summary = {"model": str(folder), "validation": outcome.metrics["validation"], "sha256": digest}
    print(json.dumps(summary, indent=2))
    return 0
