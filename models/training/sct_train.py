"""Training loop of the CBCT -> sCT network (GLFC-style, plain UNet or 3D UNet), resumable.

AdamW with linear warm-up and cosine decay, bf16 autocast on CPU by default, loss
:func:`models.training.sct_losses.sct_loss` inside the CBCT field of view. Every
``validate_every`` steps the whole validation volumes are translated and the MAE (HU) inside
body and field of view is computed; the best state (lowest MAE) is kept. The checkpoint holds
model, optimiser, best state and history, so ``resume`` continues where it stopped.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from models.errors import InputRejected
from models.networks.glfc import DEFAULT_CONFIGS, HU_SCALE, build_network, parameter_count
from models.networks.selective_scan import backend_for
from models.pipelines.cbct_to_sct.learned import predict_canonical
from models.training.sct_data import BODY_HU, SCTCase, sample_batch, sample_patches
from models.training.sct_losses import LossWeights, sct_loss


@dataclass(frozen=True)
class SCTTrainConfig:
    """Hyper-parameters of one training run.

    Attributes:
        arch: ``"glfc"``, ``"unet"`` or ``"unet3d"``
            (:data:`models.networks.glfc.DEFAULT_CONFIGS`).
        steps: Total optimiser steps.
        batch: Slices per step (2.5D) or patches of ``patch_slices`` slices (``unet3d``).
        lr: Peak learning rate.
        warmup: Linear warm-up steps.
        seed: Seed of initialisation and sampling.
        size: Training slice side (voxels).
        precision: ``"bf16"`` (autocast) or ``"fp32"``.
        validate_every: Steps between validations (0: only at the end).
        checkpoint_every: Steps between checkpoints.
        loss: Loss term weights.
        features: Channels per level instead of the architecture's default (small networks
            for tests); ``None``: the default.
    """

    arch: str = "glfc"
    steps: int = 3000
    batch: int = 8
    lr: float = 1e-3
    warmup: int = 100
    seed: int = 0
    size: int = 128
    precision: str = "bf16"
    validate_every: int = 250
    checkpoint_every: int = 50
    loss: LossWeights = field(default_factory=LossWeights)
    features: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        """Refuse values that cannot train."""
        if self.arch not in DEFAULT_CONFIGS:
            raise InputRejected(f"arch must be one of {sorted(DEFAULT_CONFIGS)}, got {self.arch!r}")
        if self.steps < 1 or self.batch < 1 or self.lr <= 0 or self.size < 16:
            raise InputRejected("steps >= 1, batch >= 1, lr > 0 and size >= 16 are needed")
        if self.precision not in ("bf16", "fp32"):
            raise InputRejected(f"precision must be bf16 or fp32, got {self.precision!r}")

    def network_config(self) -> dict[str, Any]:
        """The architecture config stored with the weights."""
        config = dict(DEFAULT_CONFIGS[self.arch])
        if self.features is not None:
            config["features"] = list(self.features)
            config["global_skips"] = config["global_skips"][-len(self.features) :]
        return config

    def to_json(self) -> dict[str, Any]:
        """JSON-compatible fields."""
        return asdict(self)


def learning_rate(config: SCTTrainConfig, step: int) -> float:
    """Warm-up then cosine decay to 2 % of the peak."""
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    t = (step - config.warmup) / max(config.steps - config.warmup, 1)
    return config.lr * (0.02 + 0.98 * 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0))))


def body_fov_mae(sct_hu: np.ndarray, case: SCTCase) -> tuple[float, float]:
    """``(sct_mae, cbct_mae)``: MAE (HU) inside body (CT > -500 HU) and field of view."""
    ct = np.asarray(case.ct, dtype=np.float32)
    mask = (ct > BODY_HU) & case.fov
    cbct = np.asarray(case.cbct, dtype=np.float32)
    return float(np.abs(sct_hu - ct)[mask].mean()), float(np.abs(cbct - ct)[mask].mean())


def validate(
    network: torch.nn.Module,
    cases: Sequence[SCTCase],
    network_config: dict[str, Any],
    precision: str,
) -> dict[str, Any]:
    """Translate each validation volume; MAE per case and mean (HU, body and FOV)."""
    per_case = {}
    for case in cases:
        cbct = np.asarray(case.cbct, np.float32)
        sct = predict_canonical(network, network_config, cbct, bf16=precision == "bf16")
        sct[~case.fov] = cbct[~case.fov]
        mae, raw = body_fov_mae(sct, case)
        per_case[case.name] = {"mae_hu": round(mae, 2), "cbct_mae_hu": round(raw, 2)}
    mean = float(np.mean([v["mae_hu"] for v in per_case.values()])) if per_case else float("nan")
    raw_mean = float(np.mean([v["cbct_mae_hu"] for v in per_case.values()])) if per_case else 0.0
    return {"mae_hu": round(mean, 2), "cbct_mae_hu": round(raw_mean, 2), "cases": per_case}


@dataclass
class SCTTrainOutcome:
    """What :func:`train` returns.

    Attributes:
        state: Final checkpoint dict (``model``, ``optimizer``, ``best``, ``history``...).
        best: Best validation record (``step``, ``mae_hu``...).
        history: Logged training steps and validations.
    """

    state: dict[str, Any]
    best: dict[str, Any]
    history: list[dict[str, Any]]


def _check_resume(state: dict[str, Any], config: SCTTrainConfig) -> None:
    saved = state.get("config", {})
    for key in ("arch", "batch", "seed", "size"):
        if saved.get(key) != getattr(config, key):
            raise InputRejected(
                f"cannot resume: the checkpoint was trained with {key}={saved.get(key)!r}, "
                f"this run asks for {getattr(config, key)!r}"
            )


def train(
    config: SCTTrainConfig,
    cases: Sequence[SCTCase],
    val_cases: Sequence[SCTCase],
    *,
    resume_state: dict[str, Any] | None = None,
    save: Callable[[dict[str, Any]], None] | None = None,
    log: Callable[[dict[str, Any]], None] | None = None,
    device: str = "cpu",
) -> SCTTrainOutcome:
    """Train (or resume) the network; call ``save(state)`` at every checkpoint.

    Args:
        config: Hyper-parameters.
        cases: Training pairs (canonical arrays).
        val_cases: Validation pairs (other patients).
        resume_state: A checkpoint dict from an earlier run of the same config, or ``None``.
        save: Receives the checkpoint dict every ``checkpoint_every`` steps and at the end.
        log: Receives each logged record (training step or validation).
        device: ``"cpu"`` or ``"cuda"``.

    Returns:
        :class:`SCTTrainOutcome`.
    """
    if not cases:
        raise InputRejected("no training cases")
    torch.manual_seed(config.seed)
    dev = torch.device(device)
    net_config = config.network_config()
    network = build_network(net_config).to(dev)
    optimizer = torch.optim.AdamW(network.parameters(), lr=config.lr, weight_decay=1e-4)
    start = 0
    history: list[dict[str, Any]] = []
    best: dict[str, Any] = {"mae_hu": float("inf"), "step": -1}
    best_model: dict[str, Any] | None = None
    if resume_state is not None:
        _check_resume(resume_state, config)
        network.load_state_dict(resume_state["model"])
        optimizer.load_state_dict(resume_state["optimizer"])
        start, history = int(resume_state["step"]), list(resume_state["history"])
        best = dict(resume_state["best"])
        best_model = resume_state.get("best_model")
        if best_model is None:
            # a checkpoint shipped without the best weights: a best record naming weights
            # that are not here would end the run with the last state under the best's name
            best = {"mae_hu": float("inf"), "step": -1}
    context = int(net_config["context"])
    depth = int(net_config["patch_slices"]) if network.dims == 3 else 0

    def state(step: int) -> dict[str, Any]:
        return {
            "step": step,
            "config": config.to_json(),
            "network": net_config,
            "model": network.state_dict(),
            "optimizer": optimizer.state_dict(),
            "best": best,
            "best_model": best_model,
            "history": history,
            "parameters": parameter_count(network),
            "scan_backend": backend_for(dev),
        }

    clock = time.perf_counter()
    for step in range(start, config.steps):
        network.train()
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(config, step)
        if depth:
            arrays = sample_patches(cases, config.seed, step, config.batch, depth, config.size)
        else:
            arrays = sample_batch(cases, config.seed, step, config.batch, context, config.size)
        x, y, m = (torch.from_numpy(a).to(dev) for a in arrays)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=config.precision == "bf16"):
            pred = network(x)
        if depth:  # the same slice-wise loss: (B, 1, D, H, W) -> (B * D, 1, H, W)
            pred, y, m = (t.transpose(1, 2).reshape(-1, 1, *t.shape[-2:]) for t in (pred, y, m))
        loss, terms = sct_loss(pred, y, m, config.loss)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(network.parameters(), 1.0)
        optimizer.step()
        done = step + 1
        if done % 10 == 0 or done == config.steps:
            record: dict[str, Any] = {
                "step": done,
                "loss": round(float(loss.detach()), 5),
                "mae_hu_batch": round(terms["l1"] * HU_SCALE, 1),
                **{k: round(v, 4) for k, v in terms.items() if k != "l1"},
                "s_per_step": round((time.perf_counter() - clock) / 10, 3),
            }
            clock = time.perf_counter()
            history.append(record)
            if log is not None:
                log(record)
        validating = config.validate_every and done % config.validate_every == 0
        if val_cases and (validating or done == config.steps):
            network.eval()
            result = validate(network, val_cases, net_config, config.precision)
            history.append({"step": done, "validation": result})
            if log is not None:
                log(history[-1])
            if result["mae_hu"] < best["mae_hu"]:
                best = {"step": done, **result}
                best_model = {k: v.detach().clone() for k, v in network.state_dict().items()}
        if save is not None and (done % config.checkpoint_every == 0 or done == config.steps):
            save(state(done))
    final = state(config.steps)
    return SCTTrainOutcome(state=final, best=best, history=history)
