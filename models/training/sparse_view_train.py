"""Resumable training of :class:`~models.networks.gloredi.GloReDiNet` on simulated sparse views.

Loss per step (network units HU / 1000):
``L1(student, target) + L1(teacher, target) + w_dir * direction + w_con * band_contrastive``,
where the student is the network on the ``v``-view FBP and the teacher the same network on the
``2 v``-view FBP (its representation detached; see :mod:`models.networks.gloredi` for how this
approximates the paper). AdamW; the batch of step ``s`` is a pure function of ``(seed, s)``, so
a run resumed from a checkpoint sees the same data as an uninterrupted one.

State goes in and out as plain dicts (``model``, ``optimizer``, ``step``, ``config``,
``history``); the caller writes them to disk (:mod:`service.cli_train`).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from models.errors import InputRejected
from models.networks.gloredi import (
    HU_SCALE,
    GloReDiNet,
    band_contrastive_loss,
    direction_loss,
)
from models.training.sparse_view_data import (
    Batch,
    CTCase,
    SimulationConfig,
    SparseViewSimulator,
    ValidationSet,
    body_psnr,
    make_batch,
)

ARCHITECTURE_KEYS = ("features", "ffc_blocks", "embed", "seed", "views", "teacher_factor", "i0")
"""Config fields a resumed run must share with its checkpoint."""


@dataclass(frozen=True)
class TrainConfig:
    """Training settings (all stored in checkpoints and metrics).

    Attributes:
        steps: Total optimisation steps (a resumed run continues up to this).
        batch_size: Slices per step.
        crop: Side of the training crops (pixels).
        lr: AdamW peak learning rate.
        lr_schedule: ``"cosine"`` (decays from ``lr`` to ``lr * lr_floor`` over ``steps``, a
            pure function of the step, so resuming keeps it) or ``"constant"``.
        lr_floor: Final learning rate as a fraction of ``lr`` (cosine only).
        weight_decay: AdamW weight decay.
        w_direction: Weight of the representation-direction loss.
        w_contrast: Weight of the band-pass contrastive loss.
        air_weight: Weight of the pixels outside the (dilated) body in the L1 terms, relative
            to 1 inside: air streaks are easy and, unweighted, dominate the loss while the
            body (where quality is measured) barely improves (seen here: 2000 steps at weight
            1 removed the air streaks and left the body PSNR unchanged).
        checkpoint_every: Steps between checkpoints (one is also written at the end).
        validate_every: Steps between validations (0: only at the end).
        seed: Seed of the initial weights and of every batch.
        features: Network width (first stage).
        ffc_blocks: FFC blocks in the bottleneck.
        embed: View-embedding size.
        views: Student view counts.
        teacher_factor: Teacher views over student views.
        i0: Photons per bin and view of the simulation.
        device: ``"cpu"`` or ``"cuda"``.
    """

    steps: int = 6000
    batch_size: int = 4
    crop: int = 96
    lr: float = 5e-4
    lr_schedule: str = "cosine"
    lr_floor: float = 0.05
    weight_decay: float = 1e-4
    w_direction: float = 0.1
    w_contrast: float = 0.02
    air_weight: float = 0.1
    checkpoint_every: int = 100
    validate_every: int = 0
    seed: int = 0
    features: int = 32
    ffc_blocks: int = 4
    embed: int = 64
    views: tuple[int, ...] = (18, 36, 60)
    teacher_factor: int = 2
    i0: float = 1e5
    device: str = "cpu"

    def __post_init__(self) -> None:
        """Validate the numeric fields."""
        if self.steps < 1 or self.batch_size < 1 or self.crop < 8 or self.checkpoint_every < 1:
            raise InputRejected("steps, batch_size, checkpoint_every must be >= 1 and crop >= 8")
        if not 0 <= self.air_weight <= 1:
            raise InputRejected(f"air_weight must be in [0, 1], got {self.air_weight}")
        if not 0 < self.lr < 1:
            raise InputRejected(f"lr must be in (0, 1), got {self.lr}")
        if self.lr_schedule not in ("cosine", "constant") or not 0 <= self.lr_floor <= 1:
            raise InputRejected(
                f"lr_schedule must be 'cosine' or 'constant' and lr_floor in [0, 1], got "
                f"{self.lr_schedule!r}, {self.lr_floor}"
            )


def learning_rate(config: TrainConfig, step: int) -> float:
    """The learning rate of optimisation step ``step`` (0-based) of ``config.steps``."""
    if config.lr_schedule == "constant":
        return config.lr
    progress = min(max(step / max(config.steps - 1, 1), 0.0), 1.0)
    floor = config.lr * config.lr_floor
    return floor + (config.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass
class TrainOutcome:
    """What :func:`train` returns.

    Attributes:
        model: The trained network (on the training device).
        state: The final checkpoint dict (as passed to ``save_checkpoint``).
        metrics: Measured figures: losses, validation PSNR per view count (FBP and network),
            seconds, steps run in this call.
    """

    model: GloReDiNet
    state: dict[str, Any]
    metrics: dict[str, Any] = field(default_factory=dict)


def build_model(config: TrainConfig) -> GloReDiNet:
    """A freshly initialised network, seeded by ``config.seed``."""
    torch.manual_seed(config.seed)
    return GloReDiNet(config.features, config.ffc_blocks, config.embed)


def _tensor(images_hu: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images_hu / HU_SCALE, dtype=np.float32))[
        :, None
    ].to(device)


def batch_loss(
    model: GloReDiNet, batch: Batch, config: TrainConfig
) -> tuple[torch.Tensor, dict[str, float]]:
    """The training objective on one batch and its parts (floats)."""
    device = next(model.parameters()).device
    student_in, teacher_in = _tensor(batch.student_hu, device), _tensor(batch.teacher_hu, device)
    target = _tensor(batch.target_hu, device)
    body = torch.from_numpy(np.ascontiguousarray(batch.body))[:, None].to(device)
    weight = torch.where(body, 1.0, config.air_weight)
    views = torch.full((student_in.shape[0],), float(batch.views), device=device)
    student = model(student_in, views)
    teacher = model(teacher_in, views * config.teacher_factor)
    rep_t = teacher.representation.detach()

    def weighted_l1(image: torch.Tensor) -> torch.Tensor:
        return ((image - target).abs() * weight).sum() / weight.sum().clamp(min=1e-6)

    rec = weighted_l1(student.image)
    rec_t = weighted_l1(teacher.image)
    direction = direction_loss(student.representation, rep_t)
    contrast = band_contrastive_loss(student.representation, rep_t)
    total = rec + rec_t + config.w_direction * direction + config.w_contrast * contrast
    parts = {
        "loss": float(total.detach()),
        "l1_student": float(rec.detach()),
        "l1_teacher": float(rec_t.detach()),
        "direction": float(direction.detach()),
        "contrast": float(contrast.detach()),
    }
    return total, parts


@torch.no_grad()
def validate(model: GloReDiNet, val: ValidationSet, batch_size: int = 8) -> dict[str, Any]:
    """Mean body-mask PSNR (dB, HU window [-1000, 1000]) of FBP and of the network per views."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: dict[str, Any] = {}
    for views, inputs in val.inputs_hu.items():
        fbp_psnr, net_psnr = [], []
        for start in range(0, inputs.shape[0], batch_size):
            part = inputs[start : start + batch_size]
            v = torch.full((part.shape[0],), float(views), device=device)
            pred = model(_tensor(part, device), v).image[:, 0].float().cpu().numpy() * HU_SCALE
            for k in range(part.shape[0]):
                target = val.target_hu[start + k]
                fbp_psnr.append(body_psnr(part[k], target))
                net_psnr.append(body_psnr(pred[k], target))
        out[str(views)] = {
            "fbp_psnr_db": float(np.mean(fbp_psnr)),
            "network_psnr_db": float(np.mean(net_psnr)),
            "slices": int(inputs.shape[0]),
        }
    model.train(was_training)
    return out


def _check_resume(state: dict[str, Any], config: TrainConfig) -> None:
    saved = state.get("config", {})
    current = asdict(config)
    for key in ARCHITECTURE_KEYS:
        a, b = saved.get(key), current[key]
        if (list(a) if isinstance(a, list | tuple) else a) != (
            list(b) if isinstance(b, list | tuple) else b
        ):
            raise InputRejected(
                f"checkpoint was made with {key}={a!r}, this run asks {key}={b!r}; "
                "use the same settings to resume, or a new output folder"
            )
    if int(state.get("step", 0)) > config.steps:
        raise InputRejected(f"checkpoint is at step {state['step']}, beyond --steps {config.steps}")


def train(
    config: TrainConfig,
    train_cases: Sequence[CTCase],
    val: ValidationSet | None,
    *,
    resume_state: dict[str, Any] | None = None,
    save_checkpoint: Callable[[dict[str, Any]], None] | None = None,
    progress: Callable[[int, int, dict[str, float]], None] | None = None,
) -> TrainOutcome:
    """Train (or continue training) up to ``config.steps``.

    Args:
        config: Settings.
        train_cases: Training patients' slices.
        val: Held-out validation set, or None (no validation figures then).
        resume_state: A checkpoint dict from an earlier call; training continues at its step
            with its weights and optimizer state.
        save_checkpoint: Called with the state dict every ``checkpoint_every`` steps and at
            the end.
        progress: Called as ``progress(step, steps, parts)`` after every step.

    Returns:
        A :class:`TrainOutcome`.

    Raises:
        InputRejected: A checkpoint made with other settings, or no training data.
    """
    device = torch.device(config.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputRejected("device 'cuda' asked for but CUDA is not available")
    simulator = SparseViewSimulator(_sim_config(config), config.device)
    model = build_model(config).to(device)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, weight_decay=config.weight_decay
    )
    step, history = 0, []
    if resume_state is not None:
        _check_resume(resume_state, config)
        model.load_state_dict(resume_state["model"])
        optimizer.load_state_dict(resume_state["optimizer"])
        step, history = int(resume_state["step"]), list(resume_state.get("history", []))
    start_step, started = step, time.perf_counter()
    validations: list[dict[str, Any]] = []
    model.train()

    def state() -> dict[str, Any]:
        # copies: the caller may keep the dict while training goes on
        return {
            "format": 1,
            "model": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "optimizer": copy.deepcopy(optimizer.state_dict()),
            "step": step,
            "config": asdict(config),
            "history": list(history),
        }

    while step < config.steps:
        batch = make_batch(
            train_cases,
            simulator,
            seed=config.seed,
            step=step,
            batch_size=config.batch_size,
            crop=config.crop,
        )
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(config, step)
        loss, parts = batch_loss(model, batch, config)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        history.append(
            {"step": step, "views": batch.views, "lr": optimizer.param_groups[0]["lr"], **parts}
        )
        if progress is not None:
            progress(step, config.steps, parts)
        if val is not None and config.validate_every and step % config.validate_every == 0:
            validations.append({"step": step, **validate(model, val)})
        if save_checkpoint is not None and step % config.checkpoint_every == 0:
            save_checkpoint(state())
    final = state()
    if save_checkpoint is not None:
        save_checkpoint(final)
    metrics: dict[str, Any] = {
        "steps_total": step,
        "steps_this_run": step - start_step,
        "resumed_from_step": start_step if resume_state is not None else None,
        "seconds_this_run": round(time.perf_counter() - started, 3),
        "last_losses": history[-min(len(history), 20) :],
        "validation_during_run": validations,
    }
    if val is not None:
        metrics["validation"] = validate(model, val)
    return TrainOutcome(model, final, metrics)


def _sim_config(config: TrainConfig) -> SimulationConfig:
    return SimulationConfig(tuple(config.views), config.teacher_factor, config.i0)


def fp16_state_dict(model: GloReDiNet) -> dict[str, torch.Tensor]:
    """The model's weights as an fp16 CPU state dict (what gets written as the weights file)."""
    return {k: v.detach().to("cpu", torch.float16) for k, v in model.state_dict().items()}
