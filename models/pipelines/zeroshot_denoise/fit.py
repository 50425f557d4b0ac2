"""The training loop shared by both self-supervised stages: seeded crops, Adam, early stopping.

Arrays are normalised intensities of one volume, shape ``(K, H, W)`` = (slices, rows, columns).
A stage supplies ``channels(k)`` -> ``(C, H, W)`` float32 for slice ``k`` and a loss on a batch
``(B, C, h, w)`` of random crops of those channels.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

_EVAL_EVERY = 25

ChannelFn = Callable[[int], npt.NDArray[np.float32]]
LossFn = Callable[[nn.Module, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class FitConfig:
    """Optimisation settings of one stage.

    Attributes:
        max_iterations: Upper bound on optimiser steps.
        min_iterations: Steps before early stopping may trigger.
        patience: Evaluations-without-progress window, in steps.
        tolerance: Relative improvement of the evaluation loss that counts as progress.
        learning_rate: Adam step size.
        crop_size: Side of the square training crops (pixels; rounded down to even).
        batch_size: Crops per step.
        seed: Seed of crop positions and network initialisation.
        early_stopping: ``False`` runs exactly ``max_iterations`` steps.
        lr_step: Halve the learning rate every ``lr_step`` steps (plain ZS-N2N schedule).
    """

    max_iterations: int
    min_iterations: int
    patience: int
    tolerance: float
    learning_rate: float
    crop_size: int
    batch_size: int
    seed: int
    early_stopping: bool = True
    lr_step: int | None = None


@dataclass(frozen=True)
class FitReport:
    """What happened while fitting one stage."""

    iterations: int
    stopped_early: bool
    best_eval_loss: float
    eval_history: list[tuple[int, float]]


class CropSampler:
    """Random (slice, crop) batches with a seeded generator.

    Args:
        channels: ``channels(k)`` -> ``(C, H, W)`` for slice ``k``.
        n_slices: ``K``.
        shape: ``(H, W)`` of one slice.
        crop_size: Requested crop side; clipped to the slice and rounded down to even.
        rng: Generator that decides every position.
    """

    def __init__(
        self,
        channels: ChannelFn,
        n_slices: int,
        shape: tuple[int, int],
        crop_size: int,
        rng: np.random.Generator,
    ) -> None:
        self.channels = channels
        self.n_slices = n_slices
        self.shape = shape
        self.rng = rng
        self.crop = (min(crop_size, shape[0]) // 2 * 2, min(crop_size, shape[1]) // 2 * 2)

    def batch(self, size: int) -> npt.NDArray[np.float32]:
        """Return ``(size, C, crop_h, crop_w)`` float32 crops."""
        (h, w), (ch, cw) = self.shape, self.crop
        crops = []
        for _ in range(size):
            k = int(self.rng.integers(self.n_slices))
            y = int(self.rng.integers(h - ch + 1))
            x = int(self.rng.integers(w - cw + 1))
            crops.append(self.channels(k)[:, y : y + ch, x : x + cw])
        return np.stack(crops).astype(np.float32, copy=False)


class _Plateau:
    """Reduce-then-stop plateau detector on the evaluation loss."""

    def __init__(self, cfg: FitConfig) -> None:
        self.cfg = cfg
        self.best = float("inf")
        self.best_at = 0
        self.reduced = False

    def update(self, it: int, loss: float) -> str:
        """Return ``"continue"``, ``"reduce"`` (halve the rate, once) or ``"stop"``."""
        if loss < self.best * (1.0 - self.cfg.tolerance):
            self.best_at = it
        self.best = min(self.best, loss)
        if it < self.cfg.min_iterations or it - self.best_at < self.cfg.patience:
            return "continue"
        if not self.reduced:
            self.reduced, self.best_at = True, it
            return "reduce"
        return "stop"


def _scale_lr(opt: torch.optim.Optimizer, factor: float) -> None:
    for group in opt.param_groups:
        group["lr"] *= factor


def train(
    net: nn.Module,
    sampler: CropSampler,
    loss_fn: LossFn,
    cfg: FitConfig,
    device: torch.device,
    progress: Callable[[float, int], None],
) -> FitReport:
    """Fit ``net`` with Adam on random crops until the evaluation loss plateaus.

    Args:
        net: Network, already on ``device``; left in eval mode.
        sampler: Source of training crops (and of one fixed evaluation batch).
        loss_fn: ``loss_fn(net, batch)`` -> scalar.
        cfg: Settings.
        device: Training device.
        progress: ``progress(fraction_of_max_iterations, iteration)`` after each evaluation.

    Returns:
        The report; the evaluation loss is measured every 25 steps on a fixed batch.
    """
    opt = torch.optim.Adam(net.parameters(), lr=cfg.learning_rate)
    eval_batch = torch.from_numpy(sampler.batch(max(cfg.batch_size, 8))).to(device)
    plateau = _Plateau(cfg)
    history: list[tuple[int, float]] = []
    stopped_early = False
    it = 0
    net.train()
    for it in range(1, cfg.max_iterations + 1):
        loss = loss_fn(net, torch.from_numpy(sampler.batch(cfg.batch_size)).to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if cfg.lr_step and it % cfg.lr_step == 0:
            _scale_lr(opt, 0.5)
        if it % _EVAL_EVERY and it != cfg.max_iterations:
            continue
        with torch.no_grad():
            history.append((it, float(loss_fn(net, eval_batch))))
        progress(it / cfg.max_iterations, it)
        decision = plateau.update(it, history[-1][1]) if cfg.early_stopping else "continue"
        if decision == "reduce":
            _scale_lr(opt, 0.5)
        elif decision == "stop":
            stopped_early = it < cfg.max_iterations
            break
    net.eval()
    best = min((v for _, v in history), default=float("nan"))
    return FitReport(it, stopped_early, best, history)


@torch.no_grad()
def apply_per_slice(
    predict: Callable[[torch.Tensor], torch.Tensor],
    channels: ChannelFn,
    n_slices: int,
    device: torch.device,
    batch: int,
    progress: Callable[[float], None],
) -> npt.NDArray[np.float32]:
    """Run ``predict`` on every slice, ``batch`` slices at a time.

    Args:
        predict: ``(B, C, H, W)`` -> ``(B, 1, H, W)`` tensor function.
        channels: ``channels(k)`` -> ``(C, H, W)``.
        n_slices: ``K``.
        device: Inference device.
        batch: Slices per forward pass.
        progress: Called with the fraction of slices done.

    Returns:
        ``(K, H, W)`` float32.
    """
    outputs = []
    for start in range(0, n_slices, batch):
        stop = min(start + batch, n_slices)
        x = torch.from_numpy(np.stack([channels(k) for k in range(start, stop)])).to(device)
        outputs.append(predict(x)[:, 0].float().cpu().numpy())
        progress(stop / n_slices)
    return np.concatenate(outputs).astype(np.float32, copy=False)
