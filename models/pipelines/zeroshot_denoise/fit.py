"""Fitting the zero-shot denoiser on one scan (ZS-N2N loss, slice context, early stopping).

All arrays here are normalised intensities (see :func:`normalise`), shape ``(K, H, W)`` =
(slices, rows, columns) of one volume. The network sees a slice with ``context`` neighbours on
each side as channels and predicts the noise of the centre slice.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F

from models.networks.zsn2n import ZSN2NNet
from models.result import ProgressCallback

_EVAL_EVERY = 25


@dataclass(frozen=True)
class FitConfig:
    """Optimisation settings (mirrors the public parameters)."""

    context: int
    max_iterations: int
    min_iterations: int
    patience: int
    tolerance: float
    learning_rate: float
    features: int
    crop_size: int
    batch_size: int
    seed: int
    early_stopping: bool = True
    lr_step: int | None = None  # plain ZS-N2N: halve the rate every lr_step iterations


@dataclass(frozen=True)
class FitReport:
    """What happened during fitting."""

    iterations: int
    stopped_early: bool
    best_eval_loss: float
    eval_history: list[tuple[int, float]]


def _pair_downsample(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ZS-N2N pair downsampling: two half-resolution images from the two 2x2 diagonals.

    Args:
        x: ``(B, C, H, W)`` with even H and W.

    Returns:
        ``(D1(x), D2(x))`` each ``(B, C, H/2, W/2)``.
    """
    c = x.shape[1]
    k1 = torch.tensor([[[[0.5, 0.0], [0.0, 0.5]]]], dtype=x.dtype, device=x.device)
    k2 = torch.tensor([[[[0.0, 0.5], [0.5, 0.0]]]], dtype=x.dtype, device=x.device)
    d1 = F.conv2d(x, k1.repeat(c, 1, 1, 1), stride=2, groups=c)
    d2 = F.conv2d(x, k2.repeat(c, 1, 1, 1), stride=2, groups=c)
    return d1, d2


def _centre(x: torch.Tensor, context: int) -> torch.Tensor:
    """Centre channel of a ``(B, 2c+1, H, W)`` stack, kept 4D."""
    return x[:, context : context + 1]


def zsn2n_loss(net: ZSN2NNet, x: torch.Tensor, context: int) -> torch.Tensor:
    """Residual + consistency loss of ZS-N2N, for a centre slice with context channels.

    Args:
        net: Predicts the noise of the centre channel.
        x: ``(B, 2*context+1, H, W)``, H and W even, normalised intensities.
        context: Neighbours on each side.

    Returns:
        Scalar loss.
    """
    d1, d2 = _pair_downsample(x)
    den1 = _centre(d1, context) - net(d1)
    den2 = _centre(d2, context) - net(d2)
    loss_res = 0.5 * (
        F.mse_loss(_centre(d1, context), den2) + F.mse_loss(_centre(d2, context), den1)
    )
    full = _centre(x, context) - net(x)
    f1, f2 = _pair_downsample(full)
    loss_cons = 0.5 * (F.mse_loss(den1, f1) + F.mse_loss(den2, f2))
    return loss_res + loss_cons


def context_stack(
    volume: npt.NDArray[np.float32], index: int, context: int
) -> npt.NDArray[np.float32]:
    """Slices ``index - context .. index + context`` (reflected at the ends), ``(2c+1, H, W)``."""
    k = volume.shape[0]
    picks = [_reflect(index + d, k) for d in range(-context, context + 1)]
    return volume[picks]


def _reflect(i: int, n: int) -> int:
    """Reflect an index into ``[0, n)`` without repeating the edge (``-1 -> 1``)."""
    if n == 1:
        return 0
    period = 2 * (n - 1)
    i = abs(i) % period
    return period - i if i >= n else i


class _CropSampler:
    """Random (slice, crop) batches from a volume with a seeded generator."""

    def __init__(self, volume: npt.NDArray[np.float32], cfg: FitConfig, rng: np.random.Generator):
        self.volume = volume
        self.cfg = cfg
        self.rng = rng
        _, h, w = volume.shape
        self.ch = min(cfg.crop_size, h) // 2 * 2
        self.cw = min(cfg.crop_size, w) // 2 * 2

    def batch(self, size: int) -> npt.NDArray[np.float32]:
        """Return ``(size, 2c+1, ch, cw)`` crops."""
        k, h, w = self.volume.shape
        out = np.empty((size, 2 * self.cfg.context + 1, self.ch, self.cw), dtype=np.float32)
        for b in range(size):
            s = int(self.rng.integers(k))
            y = int(self.rng.integers(h - self.ch + 1))
            x = int(self.rng.integers(w - self.cw + 1))
            out[b] = context_stack(self.volume, s, self.cfg.context)[
                :, y : y + self.ch, x : x + self.cw
            ]
        return out


class _Plateau:
    """Reduce-then-stop plateau detector on the evaluation loss."""

    def __init__(self, cfg: FitConfig) -> None:
        self.cfg = cfg
        self.best = float("inf")
        self.best_at = 0
        self.reduced = False

    def update(self, it: int, loss: float) -> str:
        """Return ``"continue"``, ``"reduce"`` (halve the rate once) or ``"stop"``."""
        if loss < self.best * (1.0 - self.cfg.tolerance):
            self.best, self.best_at = loss, it
        self.best = min(self.best, loss)
        if it < self.cfg.min_iterations or it - self.best_at < self.cfg.patience:
            return "continue"
        if not self.reduced:
            self.reduced, self.best_at = True, it
            return "reduce"
        return "stop"


def fit(
    volume: npt.NDArray[np.float32],
    cfg: FitConfig,
    device: torch.device,
    progress: ProgressCallback,
    progress_span: float = 1.0,
) -> tuple[ZSN2NNet, FitReport]:
    """Fit the denoiser to one normalised volume.

    Args:
        volume: ``(K, H, W)`` float32 normalised intensities.
        cfg: Settings.
        device: Where to train.
        progress: Called every evaluation with a fraction of ``progress_span``.
        progress_span: Fraction of the whole job that fitting represents.

    Returns:
        The fitted network (eval mode) and a report.
    """
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    net = ZSN2NNet(2 * cfg.context + 1, 1, cfg.features).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.learning_rate)
    sampler = _CropSampler(volume, cfg, rng)
    eval_batch = torch.from_numpy(sampler.batch(max(cfg.batch_size, 8))).to(device)
    plateau = _Plateau(cfg)
    history: list[tuple[int, float]] = []
    stopped_early = False
    it = 0
    for it in range(1, cfg.max_iterations + 1):
        x = torch.from_numpy(sampler.batch(cfg.batch_size)).to(device)
        loss = zsn2n_loss(net, x, cfg.context)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if cfg.lr_step and it % cfg.lr_step == 0:
            _scale_lr(opt, 0.5)
        if it % _EVAL_EVERY and it != cfg.max_iterations:
            continue
        with torch.no_grad():
            eval_loss = float(zsn2n_loss(net, eval_batch, cfg.context))
        history.append((it, eval_loss))
        progress(progress_span * it / cfg.max_iterations, f"fitting (iteration {it})")
        if not cfg.early_stopping:
            continue
        decision = plateau.update(it, eval_loss)
        if decision == "reduce":
            _scale_lr(opt, 0.5)
        elif decision == "stop":
            stopped_early = it < cfg.max_iterations
            break
    net.eval()
    best = min((v for _, v in history), default=float("nan"))
    return net, FitReport(it, stopped_early, best, history)


def _scale_lr(opt: torch.optim.Optimizer, factor: float) -> None:
    for group in opt.param_groups:
        group["lr"] *= factor


@torch.no_grad()
def denoise(
    net: ZSN2NNet,
    volume: npt.NDArray[np.float32],
    context: int,
    device: torch.device,
    batch: int,
    progress: ProgressCallback,
    progress_start: float,
) -> npt.NDArray[np.float32]:
    """Apply the fitted network to every slice.

    Args:
        net: Fitted network.
        volume: ``(K, H, W)`` normalised intensities.
        context: Neighbours on each side.
        device: Inference device.
        batch: Slices per forward pass.
        progress: Progress callback; fractions run from ``progress_start`` to 1.
        progress_start: Fraction of the job done before inference.

    Returns:
        ``(K, H, W)`` denoised, normalised intensities.
    """
    k = volume.shape[0]
    out = np.empty_like(volume)
    for start in range(0, k, batch):
        idx = range(start, min(start + batch, k))
        stack = np.stack([context_stack(volume, i, context) for i in idx])
        x = torch.from_numpy(stack).to(device)
        y = _centre(x, context) - net(x)
        out[start : start + len(idx)] = y[:, 0].float().cpu().numpy()
        done = progress_start + (1 - progress_start) * (start + len(idx)) / k
        progress(done, f"denoising slices {start + 1}-{start + len(idx)} of {k}")
    return out
