"""Segmentation model records: a JSON card (data, never executed) next to a weights file.

An installed model is a folder ``models/weights/segment/<name>/`` holding ``card.json`` and the
weights file the card names (with its sha256). This module is torch-free: the registry and the
parameter validation read cards without importing torch.

Card conventions:

* ``orientation`` is three axis codes (``"RAS"``, ``"LPS"``, ``"SPR"``...) naming the patient
  direction in which the network's spatial tensor axes ``0, 1, 2`` increase. ``"RAS"`` is the
  nibabel/MONAI canonical frame (tensor axis 0 toward the patient's Right, 1 toward Anterior,
  2 toward Superior); a model trained with MONAI ``Orientation(axcodes="RAS")`` on NIfTI files
  loaded by nibabel declares ``"RAS"``.
* ``spacing_mm`` and ``patch_size`` are given in that tensor-axis order (mm and voxels).
* ``labels`` are the values ``1..n`` the network's output channels ``1..n`` stand for (channel
  0 is background).
"""

from __future__ import annotations

import difflib
import json
import math
import re
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from models.errors import InputRejected
from models.labels import CodedTerm, LabelInfo
from models.provenance import file_sha256

MODELS_ROOT = Path(__file__).resolve().parents[2] / "weights" / "segment"
"""Where installed segmentation models live: ``models/weights/segment/<model>/card.json``."""

CARD_FILE = "card.json"

DEFAULT_MODEL = "head-neck-oars-unet3d"
"""The model used when ``model`` is unset and it is installed (the shipped model with the best
validation Dice; see ``models/cards/segment.md``)."""

AXIS_CODES: dict[str, tuple[int, int]] = {
    "L": (0, 1),
    "R": (0, -1),
    "P": (1, 1),
    "A": (1, -1),
    "S": (2, 1),
    "I": (2, -1),
}
"""Axis code -> (LPS world axis, sign): ``L`` is +x of LPS, ``R`` is -x, and so on."""

TRAINABLE_ARCHITECTURES = ("unet3d", "unetpp", "dynunet")
"""``architecture.name`` values ``voxelgate train segment`` builds (the others come as MONAI
bundles)."""

BUNDLE_NETWORKS: dict[str, int | None] = {
    "UNet": None,
    "BasicUNet": 16,
    "BasicUNetPlusPlus": 16,
    "DynUNet": None,
    "SegResNet": None,
    "AttentionUnet": None,
}
"""MONAI network classes a bundle config may name (by class name; anything else is refused),
with their fixed downsampling factor (``None``: computed from the arguments)."""

_RESERVED_ARGS = ("spatial_dims", "in_channels", "out_channels")


class ModelCardInvalid(InputRejected):
    """A model card (or the folder holding it) is inconsistent or unreadable."""

    code = "model_card_invalid"


class CardLabel(BaseModel):
    """One label of a card: value, name, optional SNOMED-CT codes ``[value, scheme, meaning]``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    value: int
    name: str = Field(min_length=1)
    category: tuple[str, str, str] | None = None
    type: tuple[str, str, str] | None = None
    colour: tuple[int, int, int] | None = None

    def info(self) -> LabelInfo:
        """The :class:`~models.labels.LabelInfo` written into label maps."""
        cat = None if self.category is None else CodedTerm(*self.category)
        typ = None if self.type is None else CodedTerm(*self.type)
        return LabelInfo(self.value, self.name, cat, typ, self.colour)


class Architecture(BaseModel):
    """Network definition.

    Attributes:
        name: ``unet3d`` (MONAI ``UNet``, 3D), ``unetpp`` (MONAI ``BasicUNetPlusPlus``),
            ``dynunet`` (MONAI ``DynUNet``, the nnU-Net-like baseline) or ``monai-bundle``
            (class and arguments read from the bundle config, see
            :class:`Weights`).
        args: Constructor arguments except ``spatial_dims`` (3), ``in_channels`` (1) and
            ``out_channels`` (labels + 1), which follow from the card (given, they must match).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Literal["unet3d", "unetpp", "dynunet", "monai-bundle"]
    args: dict[str, Any] = Field(default_factory=dict)


class Weights(BaseModel):
    """The weights file.

    Attributes:
        file: Path relative to the model folder (no ``..``, not absolute).
        sha256: Hex sha256 of that file.
        format: ``state-dict`` (our checkpoint: a state dict, or a dict with ``state_dict``),
            ``torchscript`` (``torch.jit.load``) or ``monai-bundle`` (a bundle's state dict).
        bundle_config: ``monai-bundle`` only: the bundle's config JSON (relative path), whose
            ``network_def`` gives the class and arguments.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    file: str
    sha256: str
    format: Literal["state-dict", "torchscript", "monai-bundle"]
    bundle_config: str | None = None

    @field_validator("file", "bundle_config")
    @classmethod
    def _relative(cls, value: str | None) -> str | None:
        if value is not None:
            path = PurePosixPath(value)
            if path.is_absolute() or ".." in path.parts or not path.parts:
                raise ValueError(f"{value!r} must be a relative path inside the model folder")
        return value

    @field_validator("sha256")
    @classmethod
    def _hex(cls, value: str) -> str:
        if not re.fullmatch(r"[0-9a-f]{64}", value):
            raise ValueError("sha256 must be 64 lower-case hex digits")
        return value


class Intensity(BaseModel):
    """Intensity handling before the network.

    ``window``: clip to ``[lower, upper]`` (image units, HU for CT) and scale to ``[0, 1]``.
    ``zscore``: ``(x - mean) / std`` with the card's ``mean``/``std`` when given, else the
    volume's own mean and standard deviation.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["window", "zscore"]
    lower: float | None = None
    upper: float | None = None
    mean: float | None = None
    std: float | None = Field(None, gt=0.0)

    @model_validator(mode="after")
    def _complete(self) -> Intensity:
        if self.kind == "window":
            if self.lower is None or self.upper is None or not self.upper > self.lower:
                raise ValueError("window intensity needs lower < upper (image units, HU for CT)")
        elif (self.mean is None) != (self.std is None):
            raise ValueError("zscore intensity needs both mean and std, or neither")
        return self


class Mirroring(BaseModel):
    """Test-time mirroring a model allows (as nnU-Net's mirror axes).

    The model was trained with these flips, so its logits may be averaged over them.

    Attributes:
        axes: Network tensor axes (``0, 1, 2`` of the card's ``orientation``) the input may be
            mirrored along; every combination is run (``2 ** len(axes)`` network passes).
        swap: Label pairs that trade places when the left-right axis (the one whose
            ``orientation`` code is L or R) is mirrored: a mirrored right parotid is a left one.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    axes: tuple[int, ...] = Field(min_length=1, max_length=3)
    swap: tuple[tuple[int, int], ...] = ()

    @field_validator("axes")
    @classmethod
    def _axes(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if len(set(value)) != len(value) or not all(0 <= a <= 2 for a in value):
            raise ValueError(f"mirroring axes must be distinct tensor axes 0..2, got {value}")
        return tuple(sorted(value))

    @field_validator("swap")
    @classmethod
    def _pairs(cls, value: tuple[tuple[int, int], ...]) -> tuple[tuple[int, int], ...]:
        flat = [v for pair in value for v in pair]
        if len(set(flat)) != len(flat):
            raise ValueError(f"mirroring swap pairs must be disjoint, got {value}")
        return value


class ModelCard(BaseModel):
    """A segmentation model's card (see the module docstring for the axis conventions).

    Attributes:
        name: Folder name of the installed model.
        version: Model version (semantic).
        architecture: Network definition.
        weights: Weights file, sha256 and format.
        modality: Input modality (``"CT"``, ``"MR"``).
        spacing_mm: Target voxel spacing in mm along tensor axes 0, 1, 2.
        orientation: Canonical frame, three axis codes (``"RAS"``...).
        intensity: Intensity handling.
        patch_size: Sliding-window size in voxels along tensor axes 0, 1, 2.
        labels: Labels ``1..n`` in any order.
        training_data: What it was trained on (text).
        metrics: Validation metrics (text).
        mirroring: Test-time mirroring the model allows (``None``: none).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]*$")
    version: str = Field(min_length=1)
    architecture: Architecture
    weights: Weights
    modality: str = Field(min_length=1)
    spacing_mm: tuple[float, float, float]
    orientation: str
    intensity: Intensity
    patch_size: tuple[int, int, int]
    labels: tuple[CardLabel, ...] = Field(min_length=1)
    training_data: str = ""
    metrics: str = ""
    mirroring: Mirroring | None = None

    @field_validator("spacing_mm")
    @classmethod
    def _positive(cls, value: tuple[float, float, float]) -> tuple[float, float, float]:
        if not all(math.isfinite(s) and s > 0 for s in value):
            raise ValueError(f"every spacing must be a finite number > 0 mm, got {value}")
        return value

    @field_validator("orientation")
    @classmethod
    def _axcodes(cls, value: str) -> str:
        value = value.upper()
        if len(value) != 3 or any(c not in AXIS_CODES for c in value):
            raise ValueError(f"orientation must be 3 of L/R, P/A, S/I, got {value!r}")
        if len({AXIS_CODES[c][0] for c in value}) != 3:
            raise ValueError(f"orientation {value!r} names one patient axis twice")
        return value

    @field_validator("labels")
    @classmethod
    def _label_values(cls, value: tuple[CardLabel, ...]) -> tuple[CardLabel, ...]:
        values = sorted(lab.value for lab in value)
        if values != list(range(1, len(value) + 1)):
            raise ValueError(
                f"label values must be 1..{len(value)}, each once (one per output channel after "
                f"background), got {values}"
            )
        names = [lab.name for lab in value]
        if len(set(names)) != len(names):
            raise ValueError(f"label names must be unique, got {names}")
        return tuple(sorted(value, key=lambda lab: lab.value))

    @model_validator(mode="after")
    def _consistent(self) -> ModelCard:
        if (self.architecture.name == "monai-bundle") != (self.weights.format == "monai-bundle"):
            raise ValueError("architecture 'monai-bundle' goes with weights format 'monai-bundle'")
        if self.weights.format == "monai-bundle" and not self.weights.bundle_config:
            raise ValueError("monai-bundle weights need bundle_config (the config JSON path)")
        if self.architecture.name != "monai-bundle":
            check_args(self.architecture.args, self.n_classes)
            factor = downsampling_factor(self.architecture.name, self.architecture.args)
            check_patch(self.patch_size, factor)
        if self.mirroring is not None and self.mirroring.swap:
            known = {lab.value for lab in self.labels}
            if not all(v in known for pair in self.mirroring.swap for v in pair):
                raise ValueError(
                    f"mirroring swap {self.mirroring.swap} names labels the card does not have"
                )
            if self.left_right_axis not in self.mirroring.axes:
                raise ValueError(
                    "mirroring swap pairs need the left-right axis "
                    f"({self.left_right_axis} of {self.orientation}) among the mirroring axes"
                )
        return self

    @property
    def left_right_axis(self) -> int:
        """The network tensor axis along which the patient's left-right runs."""
        return next(t for t, c in enumerate(self.orientation) if c in "LR")

    @property
    def n_classes(self) -> int:
        """Network output channels: labels + background."""
        return len(self.labels) + 1

    def label_infos(self) -> tuple[LabelInfo, ...]:
        """The labels as :class:`~models.labels.LabelInfo`, in value order."""
        return tuple(lab.info() for lab in self.labels)


def check_args(args: dict[str, Any], n_classes: int) -> None:
    """Refuse constructor arguments that contradict the card (3D, 1 input, n+1 outputs)."""
    expected = {"spatial_dims": 3, "in_channels": 1, "out_channels": n_classes}
    for key in _RESERVED_ARGS:
        if key in args and args[key] != expected[key]:
            raise ValueError(
                f"network argument {key}={args[key]!r} contradicts the card (expected "
                f"{expected[key]}: 3D, one input channel, labels + background outputs)"
            )


def downsampling_factor(name: str, args: dict[str, Any]) -> tuple[int, int, int]:
    """Per-axis total downsampling of a network (patch sizes must be multiples of it).

    Args:
        name: ``unet3d``/``unetpp`` or a MONAI class name from :data:`BUNDLE_NETWORKS`.
        args: Constructor arguments.

    Returns:
        Factor along tensor axes 0, 1, 2.
    """
    if name in ("unetpp", "BasicUNetPlusPlus", "BasicUNet"):
        return (16, 16, 16)
    strides = args.get("strides")
    if name in ("unet3d", "dynunet", "UNet", "AttentionUnet", "DynUNet") and strides is not None:
        factor = [1, 1, 1]
        for stride in strides:
            per_axis: list[Any] = [stride] * 3 if isinstance(stride, int) else list(stride)
            if len(per_axis) != 3 or not all(isinstance(s, int) and s >= 1 for s in per_axis):
                raise ValueError(f"strides must be positive integers (or triples), got {strides}")
            factor = [f * int(s) for f, s in zip(factor, per_axis, strict=True)]
        return (factor[0], factor[1], factor[2])
    if name == "SegResNet":
        n = 2 ** (len(args.get("blocks_down", (1, 2, 2, 4))) - 1)
        return (n, n, n)
    if name in ("unet3d", "dynunet"):
        raise ValueError(f"{name} needs 'strides' in architecture.args")
    return (1, 1, 1)


def check_patch(patch: tuple[int, int, int], factor: tuple[int, int, int]) -> None:
    """Refuse a patch size that is not a positive multiple of the downsampling factor."""
    if any(p < 1 or p % f for p, f in zip(patch, factor, strict=True)):
        raise ValueError(
            f"patch_size {list(patch)} must be positive multiples of the network's "
            f"downsampling factor {list(factor)}"
        )


def _refuse_expressions(value: Any, where: str) -> None:
    """Refuse MONAI bundle expressions (``$...``), references (``@``) and macros (``%``)."""
    if isinstance(value, str) and value[:1] in ("$", "%"):
        raise ModelCardInvalid(
            f"bundle config {where} = {value!r} is an expression; voxelgate reads bundle "
            "configs as data and never evaluates '$' expressions or '%' macros: replace it "
            "with its literal value"
        )
    if isinstance(value, dict):
        for key, item in value.items():
            _refuse_expressions(item, f"{where}.{key}")
    elif isinstance(value, list):
        for n, item in enumerate(value):
            _refuse_expressions(item, f"{where}[{n}]")


def bundle_network(config_path: Path) -> tuple[str, dict[str, Any]]:
    """Read the network class and arguments of a MONAI bundle config as data.

    ``network_def`` must be a dict whose ``_target_`` names a class of
    :data:`BUNDLE_NETWORKS` (``"UNet"`` or ``"monai.networks.nets.UNet"``). Arguments may be
    literals or ``"@key"`` references to top-level literal values of the same config; ``$``
    expressions and ``%`` macros are refused, nothing is ever evaluated.

    Args:
        config_path: The bundle's ``configs/*.json``.

    Returns:
        ``(class_name, arguments)``.

    Raises:
        ModelCardInvalid: Unreadable config, missing or unknown network, expressions.
    """
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelCardInvalid(f"bundle config {config_path.name}: {exc}") from None
    net = config.get("network_def") if isinstance(config, dict) else None
    if not isinstance(net, dict):
        raise ModelCardInvalid(f"bundle config {config_path.name} has no 'network_def' dict")
    target = net.get("_target_")
    if not isinstance(target, str):
        raise ModelCardInvalid(f"bundle config {config_path.name}: network_def has no _target_")
    module, _, cls_name = target.rpartition(".")
    allowed_module = module in ("", "monai.networks.nets") or module.startswith(
        "monai.networks.nets."
    )
    if cls_name not in BUNDLE_NETWORKS or not allowed_module:
        raise ModelCardInvalid(
            f"bundle network {target!r} is not one voxelgate builds (allowed MONAI classes: "
            f"{', '.join(sorted(BUNDLE_NETWORKS))})"
        )
    args: dict[str, Any] = {}
    for key, value in net.items():
        if key == "_target_":
            continue
        if key.startswith("_"):
            raise ModelCardInvalid(f"bundle network_def key {key!r} is not supported")
        if isinstance(value, str) and value.startswith("@"):
            ref = value[1:]
            if ref not in config:
                raise ModelCardInvalid(f"bundle network_def.{key} refers to missing {value!r}")
            value = config[ref]
            if isinstance(value, str) and value.startswith("@"):
                raise ModelCardInvalid(f"bundle network_def.{key}: chained reference {value!r}")
        _refuse_expressions(value, f"network_def.{key}")
        args[key] = value
    return cls_name, args


def read_card(folder: Path) -> ModelCard:
    """Parse and validate ``folder/card.json`` (no file checks beyond the card itself).

    Raises:
        ModelCardInvalid: Missing or unreadable card, or each inconsistency, named.
    """
    path = folder / CARD_FILE
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelCardInvalid(f"model folder {folder.name!r} has no {CARD_FILE}") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelCardInvalid(f"{folder.name}/{CARD_FILE}: {exc}") from None
    try:
        card = ModelCard.model_validate(raw)
    except ValidationError as exc:
        reasons = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'card'}: {err['msg']}"
            for err in exc.errors()
        )
        raise ModelCardInvalid(f"model card {folder.name}/{CARD_FILE}: {reasons}") from None
    if card.name != folder.name:
        raise ModelCardInvalid(
            f"model card name {card.name!r} differs from its folder name {folder.name!r}"
        )
    return card


def load_card(folder: Path, *, verify_sha256: bool = True) -> ModelCard:
    """Read a model folder: the card, the weights file and (bundles) the network config.

    Args:
        folder: ``<models root>/<name>``.
        verify_sha256: Hash the weights file and compare with the card (skip only where the
            weights are hashed again before use, e.g. parameter validation).

    Returns:
        The validated card.

    Raises:
        ModelCardInvalid: Card inconsistencies, a missing weights file, a sha256 mismatch, a
            bundle config that needs evaluation.
    """
    card = read_card(folder)
    weights = folder / card.weights.file
    if not weights.is_file():
        raise ModelCardInvalid(f"model {card.name}: weights file {card.weights.file} is missing")
    if card.weights.bundle_config is not None:
        cls_name, args = bundle_network(folder / card.weights.bundle_config)
        try:
            check_args(args, card.n_classes)
            check_patch(card.patch_size, downsampling_factor(cls_name, args))
        except ValueError as exc:
            raise ModelCardInvalid(f"model {card.name}: {exc}") from None
    if verify_sha256:
        digest = file_sha256(weights)
        if digest != card.weights.sha256:
            raise ModelCardInvalid(
                f"model {card.name}: weights {card.weights.file} have sha256 {digest}, the card "
                f"says {card.weights.sha256}; refusing weights that are not the ones described"
            )
    return card


def installed_models(root: Path = MODELS_ROOT) -> list[str]:
    """Names of the model folders under ``root`` that hold a ``card.json``, sorted."""
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / CARD_FILE).is_file())


def resolve_model(name: str | None, root: Path = MODELS_ROOT) -> str:
    """The installed model to use (its folder name).

    ``name`` when given; when ``None``, :data:`DEFAULT_MODEL` if it is installed under ``root``,
    else the only installed model.

    Raises:
        ModelCardInvalid: ``name`` is not installed, or ``None`` and zero or several models are
            (none of them the default), with the installed models (or "none") and a
            did-you-mean hint.
    """
    installed = installed_models(root)
    listing = ", ".join(installed) if installed else "none"
    where = f"{root.name}/ ({root})"
    if name is None:
        if DEFAULT_MODEL in installed:
            return DEFAULT_MODEL
        if len(installed) == 1:
            return installed[0]
        raise ModelCardInvalid(
            f"segment needs a model; installed under {where}: {listing}"
            + (
                ""
                if installed
                else " (no segmentation model in this folder; install one as "
                "<models root>/<name>/card.json + weights)"
            )
        )
    if name not in installed:
        close = difflib.get_close_matches(name, installed, n=1, cutoff=0.5)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ModelCardInvalid(
            f"segmentation model {name!r} is not installed{hint}; installed under {where}: "
            f"{listing}"
        )
    return name
