"""Losses of the CBCT -> sCT network: full-range L1, multi-window contrast loss and SSIM.

After GLFC's Multiple Contrast Loss: besides L1 over the whole HU range, the synthesis error is
measured again inside intensity windows (soft tissue, bone), each rescaled to [0, 1], so that
errors of a few HU in soft tissue (invisible against a 4000 HU range) and the bone/soft-tissue
boundary both weigh in; SSIM is computed on the windowed images too. Every term is averaged
over a mask (the CBCT field of view: outside it the CBCT has no data to translate).

Images are ``(B, 1, H, W)`` in network units (HU / :data:`~models.networks.glfc.HU_SCALE`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from models.networks.glfc import HU_SCALE

WINDOWS_HU: dict[str, tuple[float, float]] = {
    "soft_tissue": (-160.0, 240.0),
    "bone": (-500.0, 1300.0),
}
"""Contrast-loss windows (HU, lower and upper edge): soft tissue W400/L40; bone W1800/L400."""

FULL_RANGE_HU = (-1024.0, 3071.0)
"""Clip of the full-range L1 (12-bit CT range)."""


@dataclass(frozen=True)
class LossWeights:
    """Weights of the loss terms.

    Attributes:
        l1: Full-range L1 (in HU / 1000).
        window: Each window's L1 (window scaled to [0, 1]).
        ssim: Each window's ``1 - SSIM``.
    """

    l1: float = 1.0
    window: float = 1.0
    ssim: float = 0.5


def _window(x: torch.Tensor, lo_hu: float, hi_hu: float) -> torch.Tensor:
    """Network units -> the window scaled to [0, 1] (clipped outside)."""
    lo, hi = lo_hu / HU_SCALE, hi_hu / HU_SCALE
    return (x.clamp(lo, hi) - lo) / (hi - lo)


def _gaussian(size: int = 7, sigma: float = 1.5) -> torch.Tensor:
    g = torch.exp(-((torch.arange(size) - size // 2) ** 2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]


def ssim_map(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """SSIM map (Wang et al. 2004, 7 x 7 Gaussian, sigma 1.5) of two ``(B, 1, H, W)`` images.

    Returns:
        ``(B, 1, H, W)``; reflect-padded at the borders.
    """
    kernel = _gaussian().to(x.device, x.dtype)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.pad(t, (3, 3, 3, 3), mode="reflect"), kernel)

    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
    return ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))


def _masked_mean(t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (t * mask).sum() / mask.sum().clamp_min(1.0)


def sct_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor,
    weights: LossWeights | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """L1 (full range) + multi-window L1 + multi-window (1 - SSIM), averaged in ``mask``.

    Args:
        pred: Predicted sCT, ``(B, 1, H, W)``, network units.
        target: Real CT, same shape and units.
        mask: 1 where the loss counts (CBCT field of view), same shape, float.
        weights: Term weights; ``None``: :class:`LossWeights` defaults.

    Returns:
        ``(loss, terms)``: the scalar loss and each term's value (floats, for logging).
    """
    w = LossWeights() if weights is None else weights
    pred, target = pred.float(), target.float()
    lo, hi = (v / HU_SCALE for v in FULL_RANGE_HU)
    terms: dict[str, torch.Tensor] = {
        "l1": _masked_mean((pred.clamp(lo, hi) - target.clamp(lo, hi)).abs(), mask)
    }
    total = w.l1 * terms["l1"]
    for name, (w_lo, w_hi) in WINDOWS_HU.items():
        pw, tw = _window(pred, w_lo, w_hi), _window(target, w_lo, w_hi)
        terms[f"l1_{name}"] = _masked_mean((pw - tw).abs(), mask)
        terms[f"ssim_{name}"] = _masked_mean(ssim_map(pw, tw), mask)
        total = total + w.window * terms[f"l1_{name}"] + w.ssim * (1.0 - terms[f"ssim_{name}"])
    return total, {k: float(v.detach()) for k, v in terms.items()}
