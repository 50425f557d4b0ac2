"""Build and load segmentation networks from a card (torch, MONAI).

Three weight formats: our state-dict checkpoint, TorchScript, and MONAI bundle weights whose
network class and arguments are read from the bundle config as data
(:func:`~models.pipelines.segment.card.bundle_network`; never evaluated).
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch
from monai.networks import nets

from models.pipelines.segment.card import ModelCard, ModelCardInvalid, bundle_network, load_card


class FinalOutput(torch.nn.Module):
    """Wrap a network whose forward returns a list/tuple (UNet++) to return the last tensor.

    Input ``(B, 1, D0, D1, D2)``; output logits ``(B, n_classes, D0, D1, D2)``.
    """

    def __init__(self, net: torch.nn.Module) -> None:
        """Wrap ``net``."""
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of the final (full-resolution) head."""
        out = self.net(x)
        if isinstance(out, list | tuple):
            out = out[-1]
        if not isinstance(out, torch.Tensor):
            raise ModelCardInvalid(f"network returned {type(out).__name__}, not a tensor")
        return out


class MirroredOutput(torch.nn.Module):
    """Test-time mirroring: the mean of the logits over every combination of mirrored axes.

    Each window is flipped along a subset of ``mirroring.axes``, run, flipped back and, when
    the left-right axis was flipped, its ``mirroring.swap`` label channels exchanged (nnU-Net
    mirrors each window the same way). ``2 ** len(axes)`` network passes per window.
    Input ``(B, 1, p0, p1, p2)``; output logits ``(B, n_classes, p0, p1, p2)``.
    """

    swap: torch.Tensor

    def __init__(self, net: torch.nn.Module, card: ModelCard) -> None:
        """Wrap ``net`` with the card's mirroring (the card must allow some)."""
        super().__init__()
        if card.mirroring is None:
            raise ModelCardInvalid(f"model {card.name}: its card allows no test-time mirroring")
        self.net = net
        axes = card.mirroring.axes
        self.flips = [
            tuple(2 + a for n, a in enumerate(axes) if mask >> n & 1)
            for mask in range(1, 2 ** len(axes))
        ]
        self.lr_dim = 2 + card.left_right_axis
        perm = list(range(card.n_classes))
        for a, b in card.mirroring.swap:
            perm[a], perm[b] = b, a
        self.register_buffer("swap", torch.tensor(perm), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Mean logits over the identity and every mirror combination (float32)."""
        total = self.net(x).float()
        for dims in self.flips:
            out = torch.flip(self.net(torch.flip(x, dims)), dims).float()
            if self.lr_dim in dims:
                out = out.index_select(1, self.swap)
            total = total + out
        return total / (len(self.flips) + 1)


def _monai_class(name: str) -> type[torch.nn.Module]:
    cls: type[torch.nn.Module] = getattr(nets, name)
    return cls


def build_network(card: ModelCard, folder: Path | None = None) -> FinalOutput:
    """Instantiate the card's network (untrained) in eval mode.

    Args:
        card: The model card; ``unet3d`` -> MONAI ``UNet``, ``unetpp`` -> ``BasicUNetPlusPlus``,
            ``dynunet`` -> ``DynUNet`` (the nnU-Net-like baseline),
            ``monai-bundle`` -> the whitelisted class named by the bundle config.
        folder: Model folder (needed for ``monai-bundle`` only).

    Returns:
        A module mapping ``(B, 1, D0, D1, D2)`` to logits ``(B, n_labels + 1, D0, D1, D2)``.
    """
    fixed: dict[str, Any] = {"spatial_dims": 3, "in_channels": 1, "out_channels": card.n_classes}
    if card.architecture.name == "unet3d":
        cls, args = _monai_class("UNet"), dict(card.architecture.args)
    elif card.architecture.name == "unetpp":
        cls, args = _monai_class("BasicUNetPlusPlus"), dict(card.architecture.args)
    elif card.architecture.name == "dynunet":
        cls, args = _monai_class("DynUNet"), dict(card.architecture.args)
    else:
        if folder is None or card.weights.bundle_config is None:
            raise ModelCardInvalid("a monai-bundle model needs its folder and bundle_config")
        name, args = bundle_network(folder / card.weights.bundle_config)
        cls = _monai_class(name)
    args.update(fixed)
    try:
        net = cls(**args)
    except (TypeError, ValueError) as exc:
        raise ModelCardInvalid(f"model {card.name}: cannot build {cls.__name__}: {exc}") from None
    return FinalOutput(net).eval()


def state_dict_of(obj: Any) -> dict[str, torch.Tensor]:
    """The state dict in a loaded weights file: the object or its ``state_dict``/``model`` key.

    Raises:
        ModelCardInvalid: Neither is a dict of tensors.
    """
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelCardInvalid("checkpoint is not a state dict of tensors")
    return obj


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The state dict in a weights file (a state dict, or a checkpoint with ``model``), on CPU.

    Raises:
        ModelCardInvalid: The file cannot be read as torch weights, or holds no state dict.
    """
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, EOFError, pickle.UnpicklingError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelCardInvalid(f"not a weights file: {reason}") from None
    return state_dict_of(loaded)


def load_network(folder: Path, device: str) -> tuple[ModelCard, FinalOutput]:
    """Load an installed model folder: card (sha256 verified), then the network, eval mode.

    Args:
        folder: ``<models root>/<name>`` holding ``card.json`` and the weights.
        device: ``"cpu"`` or ``"cuda"``.

    Returns:
        ``(card, network)``; the network maps ``(B, 1, D0, D1, D2)`` to logits.

    Raises:
        ModelCardInvalid: Any card inconsistency, sha256 mismatch or weights that do not fit.
    """
    card = load_card(folder, verify_sha256=True)
    path = folder / card.weights.file
    if card.weights.format == "torchscript":
        try:
            script = torch.jit.load(str(path), map_location=device)
        except RuntimeError as exc:
            raise ModelCardInvalid(f"model {card.name}: not TorchScript: {exc}") from None
        return card, FinalOutput(script).eval()
    net = build_network(card, folder)
    try:
        state = read_state_dict(path)
    except ModelCardInvalid as exc:
        raise ModelCardInvalid(f"model {card.name}: {exc}") from None
    try:
        net.net.load_state_dict(state, strict=True)
    except (RuntimeError, OSError) as exc:
        raise ModelCardInvalid(f"model {card.name}: weights do not fit the card: {exc}") from None
    return card, net.to(device)
