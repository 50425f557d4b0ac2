"""Resumable training of the ``segment`` networks (MONAI UNet / BasicUNetPlusPlus).

Loss: masked cross-entropy + soft Dice (:func:`masked_dice_ce`): voxels labelled
:data:`~models.training.segment_data.IGNORE` contribute nothing; classes a case does not
annotate (``SegCase.present``) are merged into background (marginal loss: the network is not
told "background" where the organ was simply not contoured) and get no Dice term. UNet++ with
deep supervision returns one full-resolution output per nested level; the loss is their mean.

AdamW with a polynomial (nnU-Net, power 0.9) learning-rate decay that is a pure function of the
step; the batch of step ``s`` is a pure function of ``(seed, s)``; so a resumed run repeats an
uninterrupted one. State goes in and out as plain dicts (``model``, ``optimizer``, ``step``,
``best``, ``history``, ``config``); the caller writes them (:mod:`workers.train_segment`).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.inferers import sliding_window_inference
from monai.networks import nets

from models.errors import InputRejected
from models.pipelines.segment.card import TRAINABLE_ARCHITECTURES
from models.training.segment_data import IGNORE, AugmentConfig, SegCase, make_batch

RESUME_KEYS = ("arch", "net_args", "n_labels", "patch", "seed", "batch_size", "lr")
"""Config fields a resumed run must share with its checkpoint."""


@dataclass(frozen=True)
class SegTrainConfig:
    """Training settings (stored in checkpoints and metrics).

    Attributes:
        arch: ``unet3d`` (MONAI ``UNet``), ``unetpp`` (``BasicUNetPlusPlus``, trained with
            deep supervision) or ``dynunet`` (MONAI ``DynUNet``, nnU-Net-like; the baseline of
            issue 6, trained without deep supervision here).
        net_args: Network arguments as written in the card (``channels``/``strides``... for
            ``unet3d``, ``features`` for ``unetpp``).
        n_labels: Labels ``1..n`` (the network has ``n + 1`` outputs).
        patch: Training patch ``(P0, P1, P2)`` voxels (also the validation window).
        steps: Total optimisation steps.
        batch_size: Patches per step.
        lr: AdamW initial learning rate (poly decay to 0 over ``steps``).
        weight_decay: AdamW weight decay.
        seed: Seed of the initial weights and of every batch.
        validate_every: Steps between validations (0: only at the end).
        checkpoint_every: Steps between checkpoints (one is also written at the end).
        augment: Sampling and augmentation.
        device: ``"cpu"`` or ``"cuda"``.
        precision: ``"fp32"`` or ``"bf16"`` (autocast of the forward passes, in training and
            validation; the loss and the optimiser stay float32). On CPU bf16 trains a 3D UNet
            step about 1.5x faster and a UNet++ step about 3x faster (one thread, measured here).
    """

    arch: str = "unet3d"
    net_args: dict[str, Any] = field(default_factory=dict)
    n_labels: int = 1
    patch: tuple[int, int, int] = (96, 96, 96)
    steps: int = 1000
    batch_size: int = 2
    lr: float = 3e-3
    weight_decay: float = 1e-5
    seed: int = 0
    validate_every: int = 0
    checkpoint_every: int = 100
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    device: str = "cpu"
    precision: str = "fp32"

    def __post_init__(self) -> None:
        """Validate the fields."""
        if self.precision not in ("fp32", "bf16"):
            raise InputRejected(f"precision must be fp32 or bf16, got {self.precision!r}")
        if self.arch not in TRAINABLE_ARCHITECTURES:
            raise InputRejected(
                f"arch must be one of {', '.join(TRAINABLE_ARCHITECTURES)}, got {self.arch!r}"
            )
        if self.steps < 1 or self.batch_size < 1 or self.checkpoint_every < 1 or self.n_labels < 1:
            raise InputRejected("steps, batch_size, checkpoint_every, n_labels must be >= 1")
        if not 0 < self.lr < 1:
            raise InputRejected(f"lr must be in (0, 1), got {self.lr}")
        if self.arch == "unetpp" and any(p < 32 or p % 16 for p in self.patch):
            raise InputRejected(
                f"unetpp needs patch sides that are multiples of 16 and >= 32 (its instance-"
                f"normalised bottleneck needs more than one voxel), got {list(self.patch)}"
            )


def build_network(config: SegTrainConfig) -> torch.nn.Module:
    """A freshly initialised network (seeded by ``config.seed``), as the card will build it.

    ``unetpp`` gets ``deep_supervision=True`` for training (same state dict keys as without).
    """
    torch.manual_seed(config.seed)
    fixed = {"spatial_dims": 3, "in_channels": 1, "out_channels": config.n_labels + 1}
    if config.arch == "unet3d":
        return nets.UNet(**{**config.net_args, **fixed})
    if config.arch == "dynunet":
        return nets.DynUNet(**{**config.net_args, **fixed, "deep_supervision": False})
    return nets.BasicUNetPlusPlus(**{**config.net_args, **fixed, "deep_supervision": True})


def learning_rate(config: SegTrainConfig, step: int) -> float:
    """Poly decay ``lr * (1 - step / steps) ** 0.9`` (a pure function of the step)."""
    return config.lr * (1.0 - min(step, config.steps - 1) / config.steps) ** 0.9


def _merged_log_probs(
    logits: torch.Tensor, present: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities with absent classes merged into background, and probabilities.

    Args:
        logits: ``(B, C, ...)``.
        present: ``(B, C)`` bool (channel 0 always true).

    Returns:
        ``(log_p, p)``, both ``(B, C, ...)``: channel 0 is ``log(p_bg + sum p_absent)``;
        absent channels are ``-inf`` in ``log_p`` (never a target) and 0 in ``p``.
    """
    log_p = F.log_softmax(logits.float(), dim=1)
    extra = (1,) * (logits.dim() - 2)
    absent = (~present).view(*present.shape, *extra)
    bg_group = absent.clone()
    bg_group[:, 0] = True
    neg_inf = torch.finfo(log_p.dtype).min
    merged_bg = torch.logsumexp(torch.where(bg_group, log_p, neg_inf), dim=1, keepdim=True)
    log_p = torch.where(absent, neg_inf, log_p)
    log_p = torch.cat([merged_bg, log_p[:, 1:]], dim=1)
    return log_p, torch.where(absent, 0.0, log_p.exp())


def masked_dice_ce(
    logits: torch.Tensor,
    target: torch.Tensor,
    present: torch.Tensor | None = None,
    ignore: int = IGNORE,
    smooth: float = 1.0,
) -> torch.Tensor:
    """Cross-entropy + soft Dice over the labelled voxels only.

    Args:
        logits: ``(B, C, D0, D1, D2)`` network output.
        target: ``(B, D0, D1, D2)`` integer labels ``0..C-1`` or ``ignore``.
        present: ``(B, C)`` bool, the classes each case annotates (``None``: all). Absent
            classes are merged into background and get no Dice term.
        ignore: Label of unlabelled voxels: no CE, no Dice contribution, no gradient.
        smooth: Dice smoothing (added to numerator and denominator, voxels).

    Returns:
        Scalar: mean CE over labelled voxels + (1 - mean Dice over the present foreground
        classes of every case).
    """
    b, c = logits.shape[:2]
    if present is None:
        present = torch.ones((b, c), dtype=torch.bool, device=logits.device)
    valid = target != ignore
    safe = torch.where(valid, target.long(), 0)
    log_p, prob = _merged_log_probs(logits, present)
    nll = -log_p.gather(1, safe[:, None])[:, 0]
    ce = (nll * valid).sum() / valid.sum().clamp(min=1)
    onehot = F.one_hot(safe, c).movedim(-1, 1).float() * valid[:, None]
    prob = prob * valid[:, None]
    dims = tuple(range(2, logits.dim()))
    inter = (prob * onehot).sum(dims)
    denom = prob.sum(dims) + onehot.sum(dims)
    dice = (2 * inter + smooth) / (denom + smooth)
    fg = present.clone()
    fg[:, 0] = False
    dice_loss = 1.0 - (dice * fg).sum() / fg.sum().clamp(min=1)
    return ce + dice_loss


def training_loss(
    output: torch.Tensor | Sequence[torch.Tensor],
    target: torch.Tensor,
    present: torch.Tensor | None,
) -> torch.Tensor:
    """:func:`masked_dice_ce`, averaged over deep-supervision outputs when there are several."""
    outputs = [output] if isinstance(output, torch.Tensor) else list(output)
    return torch.stack([masked_dice_ce(o, target, present) for o in outputs]).mean()


def _final(output: Any) -> torch.Tensor:
    out = output[-1] if isinstance(output, list | tuple) else output
    assert isinstance(out, torch.Tensor)
    return out


def autocast(device: torch.device, precision: str) -> torch.autocast:
    """The autocast context of ``precision`` (disabled for fp32)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


@torch.no_grad()
def predict(
    model: torch.nn.Module, image: np.ndarray, patch: Sequence[int], precision: str = "fp32"
) -> np.ndarray:
    """Sliding-window (Gaussian, overlap 0.25) argmax labels of one normalised ``(D0, D1, D2)``."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None].to(device)

    def forward(t: torch.Tensor) -> torch.Tensor:
        with autocast(device, precision):
            return _final(model(t)).float()

    logits = sliding_window_inference(x, tuple(patch), 2, forward, overlap=0.25, mode="gaussian")
    model.train(was_training)
    assert isinstance(logits, torch.Tensor)
    return logits.argmax(1)[0].cpu().numpy().astype(np.uint8)


def dice_per_label(pred: np.ndarray, case: SegCase, n_labels: int) -> dict[int, float]:
    """Hard Dice per annotated label on the labelled voxels of ``case`` (both empty: 1)."""
    valid = case.label != IGNORE
    labels = case.present if case.present is not None else range(1, n_labels + 1)
    out = {}
    for v in labels:
        a, t = (pred == v) & valid, (case.label == v) & valid
        denom = int(a.sum() + t.sum())
        out[int(v)] = 1.0 if denom == 0 else float(2 * (a & t).sum() / denom)
    return out


def validate(
    model: torch.nn.Module, cases: Sequence[SegCase], config: SegTrainConfig
) -> dict[str, Any]:
    """Mean validation Dice per label (over the cases annotating it) and overall."""
    per: dict[int, list[float]] = {}
    for case in cases:
        for v, d in dice_per_label(
            predict(model, case.image, config.patch, config.precision), case, config.n_labels
        ).items():
            per.setdefault(v, []).append(d)
    dice = {str(v): float(np.mean(d)) for v, d in sorted(per.items())}
    return {
        "dice": dice,
        "mean_dice": float(np.mean(list(dice.values()))) if dice else float("nan"),
        "cases": len(cases),
    }


@dataclass(frozen=True)
class InitialWeights:
    """Weights a new training run starts from (see :func:`train`).

    Attributes:
        weights: A state dict of the configured network (any float dtype; fp16 files are fine).
        source: What they are, recorded in the checkpoint and metrics (e.g. file and sha256).
    """

    weights: dict[str, torch.Tensor]
    source: str


@dataclass
class SegTrainOutcome:
    """What :func:`train` returns.

    Attributes:
        model: The best network (highest validation mean Dice; the last one without validation).
        state: The final checkpoint dict.
        metrics: Measured figures.
    """

    model: torch.nn.Module
    state: dict[str, Any]
    metrics: dict[str, Any] = field(default_factory=dict)


def _check_resume(state: dict[str, Any], config: SegTrainConfig) -> None:
    saved, current = state.get("config", {}), asdict(config)
    for key in RESUME_KEYS:
        a, b = saved.get(key), current[key]
        if (list(a) if isinstance(a, list | tuple) else a) != (
            list(b) if isinstance(b, list | tuple) else b
        ):
            raise InputRejected(
                f"checkpoint was made with {key}={a!r}, this run asks {key}={b!r}; use the same "
                "settings to resume, or a new output folder"
            )
    if int(state.get("step", 0)) > config.steps:
        raise InputRejected(f"checkpoint is at step {state['step']}, beyond steps {config.steps}")


def train(
    config: SegTrainConfig,
    train_cases: Sequence[SegCase],
    val_cases: Sequence[SegCase],
    *,
    resume_state: dict[str, Any] | None = None,
    initial: InitialWeights | None = None,
    save_checkpoint: Callable[[dict[str, Any]], None] | None = None,
    progress: Callable[[int, int, float], None] | None = None,
) -> SegTrainOutcome:
    """Train (or continue) up to ``config.steps``, validating and keeping the best weights.

    Args:
        config: Settings.
        train_cases: Training cases.
        val_cases: Held-out cases (may be empty: then the last weights are "best").
        resume_state: A checkpoint dict from an earlier call.
        initial: Weights to start a new run from (fine-tuning, or continuing a model whose
            optimiser state was not kept) instead of the seeded initialisation: step 0, fresh
            AdamW moments, the full learning-rate schedule. Not with ``resume_state``.
        save_checkpoint: Called with the state every ``checkpoint_every`` steps and at the end.
        progress: ``progress(step, steps, loss)`` after every step.

    Returns:
        A :class:`SegTrainOutcome`; ``metrics["initialised_from"]`` names the initial weights
        (kept across resumes; ``None``: seeded initialisation).

    Raises:
        InputRejected: Bad device, a checkpoint made with other settings, both ``resume_state``
            and ``initial``, or initial weights that do not fit the network.
    """
    device = torch.device(config.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputRejected("device 'cuda' asked for but CUDA is not available")
    if resume_state is not None and initial is not None:
        raise InputRejected(
            "initial weights start a new run; a resumed run continues from its checkpoint"
        )
    if resume_state is not None:
        _check_resume(resume_state, config)
    model = build_network(config).to(device)
    initialised_from = None if resume_state is None else resume_state.get("initialised_from")
    if initial is not None:
        try:
            model.load_state_dict(initial.weights, strict=True)
        except RuntimeError as exc:
            raise InputRejected(
                f"initial weights {initial.source} do not fit the {config.arch} network "
                f"{config.net_args}: {str(exc).splitlines()[0]}"
            ) from None
        initialised_from = initial.source
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, weight_decay=config.weight_decay
    )
    step, history, validations = 0, [], []
    best: dict[str, Any] = {"mean_dice": -1.0, "step": 0, "model": None, "validation": None}
    if resume_state is not None:
        model.load_state_dict(resume_state["model"])
        optimizer.load_state_dict(resume_state["optimizer"])
        step = int(resume_state["step"])
        history = list(resume_state.get("history", []))
        validations = list(resume_state.get("validations", []))
        best = dict(resume_state["best"])
    start_step, started = step, time.perf_counter()

    def weights() -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}

    def evaluate() -> None:
        result = {"step": step, **validate(model, val_cases, config)}
        validations.append(result)
        if result["mean_dice"] > best["mean_dice"]:
            best.update(
                mean_dice=result["mean_dice"], step=step, model=weights(), validation=result
            )

    def state() -> dict[str, Any]:
        return {
            "format": 1,
            "model": weights(),
            "optimizer": copy.deepcopy(optimizer.state_dict()),
            "step": step,
            "best": dict(best),
            "history": list(history),
            "validations": list(validations),
            "config": asdict(config),
            "initialised_from": initialised_from,
        }

    model.train()
    while step < config.steps:
        images, labels, present = make_batch(
            train_cases,
            seed=config.seed,
            step=step,
            batch_size=config.batch_size,
            patch=config.patch,
            n_labels=config.n_labels,
            config=config.augment,
        )
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(config, step)
        with autocast(device, config.precision):
            output = model(torch.from_numpy(images).to(device))
        loss = training_loss(
            output,
            torch.from_numpy(labels).to(device),
            torch.from_numpy(present).to(device),
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        history.append({"step": step, "loss": float(loss.detach())})
        if progress is not None:
            progress(step, config.steps, float(loss.detach()))
        if val_cases and config.validate_every and step % config.validate_every == 0:
            evaluate()
        if save_checkpoint is not None and step % config.checkpoint_every == 0:
            save_checkpoint(state())
    if val_cases and (not validations or validations[-1]["step"] != step):
        evaluate()
    final = state()
    if save_checkpoint is not None:
        save_checkpoint(final)
    if best["model"] is not None:
        model.load_state_dict(best["model"])
    metrics = {
        "steps_total": step,
        "steps_this_run": step - start_step,
        "resumed_from_step": start_step if resume_state is not None else None,
        "initialised_from": initialised_from,
        "seconds_this_run": round(time.perf_counter() - started, 3),
        "best_step": best["step"] if best["model"] is not None else step,
        "validation": best["validation"],
        "validation_during_run": validations,
        "last_losses": history[-min(len(history), 20) :],
    }
    return SegTrainOutcome(model.eval(), final, metrics)
