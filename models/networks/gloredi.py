"""A GloReDi-inspired post-processing network for sparse-view CT, with its distillation losses.

After "Learning to Distill Global Representation for Sparse-View CT" (Li et al., ICCV 2023):
an FBP image goes through a convolutional encoder; the bottleneck holds fast Fourier
convolution (FFC, Chi et al., NeurIPS 2020) blocks whose global branch takes a real 2D FFT of
the feature map, mixes the real and imaginary parts with a 1x1 convolution in the frequency
domain and transforms back, so every output element depends on the whole image; a local 3x3
branch sits beside it. A decoder with skip connections predicts a residual that is added to the
input. The view count conditions every stage by FiLM (per-channel scale and shift from an MLP of
``log(views)``), so one model serves 18, 36 and 60 views.

Distillation (approximations of the paper, stated here so nobody mistakes them for its exact
recipe):

* :func:`direction_loss` is the representation-direction term: ``1 - cos`` between the
  student's (sparse views) and the teacher's (intermediate views) global representations per
  sample; only the direction is matched, not the magnitude, as in the paper.
* :func:`band_contrastive_loss` is the band-pass-specific contrastive term: both global
  representations are band-pass filtered (here a radial mask on the 2D FFT of the feature map;
  the paper uses a DCT band mask and a memory bank of negatives) and an InfoNCE loss pulls each
  student sample towards its own teacher and away from the other samples of the batch (in-batch
  negatives only; with a batch of one the term is zero).
* The paper pre-trains a separate teacher on intermediate-view inputs; the training loop of
  :mod:`models.training.sparse_view_train` instead runs the same network on the
  intermediate-view input as the teacher, with its representation detached (a
  self-distillation variant that needs one set of weights).

Images in and out are ``(B, 1, H, W)`` in network units: ``HU / 1000`` (water 0, air -1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

HU_SCALE = 1000.0
"""Network units: an image in HU is divided by this (water 0, air -1)."""


class FourierUnit(nn.Module):
    """Global branch of FFC: ``irfft2(conv1x1([Re, Im](rfft2(x))))``.

    Args:
        channels: Input and output channels.

    Input and output ``(B, channels, H, W)``; any ``H, W``. Every output pixel depends on every
    input pixel (a 1x1 convolution of the spectrum is a global operation in space).
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2 * channels, 2 * channels, 1)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``(B, C, H, W)``."""
        height, width = x.shape[-2:]
        spectrum = torch.fft.rfft2(x.float(), norm="ortho")  # (B, C, H, W//2+1) complex
        stacked = torch.cat([spectrum.real, spectrum.imag], dim=1).to(x.dtype)
        mixed = self.act(self.conv(stacked)).float()
        real, imag = mixed.chunk(2, dim=1)
        out = torch.fft.irfft2(torch.complex(real, imag), s=(height, width), norm="ortho")
        return out.to(x.dtype)


class FFCBlock(nn.Module):
    """Residual FFC block: a local 3x3 branch and a global Fourier branch, then a 1x1 fuse.

    Args:
        channels: Channels of the block (half go to each branch after a 1x1 split).

    Input ``(B, C, H, W)``; returns ``(output, global_features)``, both ``(B, C, H, W)`` and
    ``(B, C // 2, H, W)``: the global branch's output is the block's global representation.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        half = channels // 2
        self.split = nn.Conv2d(channels, 2 * half, 1)
        self.local = nn.Sequential(nn.Conv2d(half, half, 3, padding=1), nn.GELU())
        self.fourier = FourierUnit(half)
        self.fuse = nn.Conv2d(2 * half, channels, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(x + fused, global_features)``."""
        local_in, global_in = self.split(x).chunk(2, dim=1)
        global_out = self.fourier(global_in) + global_in
        fused = self.fuse(torch.cat([self.local(local_in), global_out], dim=1))
        return x + fused, global_out


class FiLM(nn.Module):
    """Per-channel scale and shift from a view embedding: ``x * (1 + g) + b``."""

    def __init__(self, embed: int, channels: int) -> None:
        super().__init__()
        self.proj = nn.Linear(embed, 2 * channels)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        """``x`` ``(B, C, H, W)``, ``embedding`` ``(B, E)``; returns ``(B, C, H, W)``."""
        gamma, beta = self.proj(embedding)[:, :, None, None].chunk(2, dim=1)
        return x * (1.0 + gamma) + beta


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.GELU())


@dataclass(frozen=True)
class GloReDiOutput:
    """What :class:`GloReDiNet` returns.

    Attributes:
        image: Reconstruction ``(B, 1, H, W)`` in network units (HU / 1000).
        representation: Global representation ``(B, C, H / 4, W / 4)`` of the last FFC block
            (the padded size when ``H`` or ``W`` is not a multiple of 4).
    """

    image: torch.Tensor
    representation: torch.Tensor


class GloReDiNet(nn.Module):
    """Encoder (two stride-2 stages), FFC bottleneck, decoder with skips, residual output.

    Args:
        features: Channels of the first stage (the bottleneck has ``4 * features``).
        ffc_blocks: Number of FFC blocks in the bottleneck.
        embed: Size of the view-count embedding.

    ``forward(image, views)``: ``image`` ``(B, 1, H, W)`` in HU / 1000, any ``H, W >= 4``
    (padded by reflection to a multiple of 4 and cropped back); ``views`` ``(B,)`` view counts
    (any positive number). Returns a :class:`GloReDiOutput`.
    """

    def __init__(self, features: int = 32, ffc_blocks: int = 4, embed: int = 64) -> None:
        super().__init__()
        f = features
        self.embed = nn.Sequential(nn.Linear(2, embed), nn.GELU(), nn.Linear(embed, embed))
        self.stem = nn.Sequential(_conv(1, f), _conv(f, f))
        self.down1 = nn.Sequential(_conv(f, 2 * f, stride=2), _conv(2 * f, 2 * f))
        self.down2 = nn.Sequential(_conv(2 * f, 4 * f, stride=2), _conv(4 * f, 4 * f))
        self.blocks = nn.ModuleList(FFCBlock(4 * f) for _ in range(ffc_blocks))
        self.films = nn.ModuleList(
            FiLM(embed, c) for c in (f, 2 * f, 4 * f, *(4 * f for _ in range(ffc_blocks)))
        )
        self.up2 = nn.ConvTranspose2d(4 * f, 2 * f, 2, stride=2)
        self.dec2 = nn.Sequential(_conv(4 * f, 2 * f), _conv(2 * f, 2 * f))
        self.up1 = nn.ConvTranspose2d(2 * f, f, 2, stride=2)
        self.dec1 = nn.Sequential(_conv(2 * f, f), _conv(f, f))
        self.head = nn.Conv2d(f, 1, 1)
        with torch.no_grad():  # start as the identity: output = input
            self.head.weight.zero_()
            self.head.bias.zero_()  # type: ignore[union-attr]

    def view_embedding(self, views: torch.Tensor) -> torch.Tensor:
        """Embed view counts ``(B,)`` as ``(B, embed)`` (from ``log(views)`` and ``1/views``)."""
        v = views.to(torch.float32).clamp(min=1.0)
        code = torch.stack([torch.log(v) / math.log(1000.0), 10.0 / v], dim=1)
        out: torch.Tensor = self.embed(code.to(self.head.weight.dtype))
        return out

    def forward(self, image: torch.Tensor, views: torch.Tensor) -> GloReDiOutput:
        """Reconstruct ``(B, 1, H, W)``; see the class docstring."""
        if image.ndim != 4 or image.shape[1] != 1:
            raise ValueError(f"image must be (B, 1, H, W), got {tuple(image.shape)}")
        height, width = image.shape[-2:]
        pad_h, pad_w = (-height) % 4, (-width) % 4
        x = F.pad(image, (0, pad_w, 0, pad_h), mode="reflect") if pad_h or pad_w else image
        emb = self.view_embedding(views.to(image.device))
        films = iter(self.films)
        s1 = next(films)(self.stem(x), emb)
        s2 = next(films)(self.down1(s1), emb)
        h = next(films)(self.down2(s2), emb)
        representation = h
        for block, film in zip(self.blocks, films, strict=False):
            h, representation = block(h)
            h = film(h, emb)
        d2 = self.dec2(torch.cat([self.up2(h), s2], dim=1))
        d1 = self.dec1(torch.cat([self.up1(d2), s1], dim=1))
        out = x + self.head(d1)
        return GloReDiOutput(out[..., :height, :width], representation)


def direction_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Representation-direction distillation: mean over the batch of ``1 - cos(s, t)``.

    Args:
        student: Student representation ``(B, ...)``.
        teacher: Teacher representation, same shape (detach it to keep the teacher fixed).

    Returns:
        Scalar in ``[0, 2]``; 0 when every pair points the same way.
    """
    cos = F.cosine_similarity(student.flatten(1), teacher.flatten(1), dim=1, eps=1e-8)
    return (1.0 - cos).mean()


def band_pass(features: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """Keep the spatial frequencies with radius in ``[low, high)`` (fraction of Nyquist).

    Args:
        features: ``(B, C, H, W)``.
        low: Lower edge, in ``[0, 1)`` of the Nyquist radius.
        high: Upper edge, ``> low`` (values above 1 keep the corners of the spectrum too).

    Returns:
        The band-passed features, ``(B, C, H, W)`` (real).
    """
    height, width = features.shape[-2:]
    fy = torch.fft.fftfreq(height, device=features.device)[:, None] * 2.0
    fx = torch.fft.rfftfreq(width, device=features.device)[None, :] * 2.0
    radius = torch.sqrt(fy**2 + fx**2)
    mask = ((radius >= low) & (radius < high)).to(torch.float32)
    spectrum = torch.fft.rfft2(features.float(), norm="ortho") * mask
    return torch.fft.irfft2(spectrum, s=(height, width), norm="ortho").to(features.dtype)


def band_contrastive_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    bands: tuple[tuple[float, float], ...] = ((0.0, 0.5), (0.5, 1.5)),
    temperature: float = 0.1,
) -> torch.Tensor:
    """Band-pass contrastive distillation (InfoNCE with in-batch negatives), averaged over bands.

    For every band, both representations are band-passed, flattened and L2-normalised; the
    logits ``s_i . t_j / temperature`` are scored by cross-entropy with the diagonal as the
    positive pairs.

    Args:
        student: Student representation ``(B, C, H, W)``.
        teacher: Teacher representation, same shape (detached by the caller).
        bands: ``(low, high)`` radial bands as fractions of the Nyquist radius.
        temperature: Softmax temperature (0.1 as in the paper's code).

    Returns:
        Scalar loss; exactly 0 when ``B < 2`` (no negatives).
    """
    if student.shape[0] < 2:
        return student.sum() * 0.0
    target = torch.arange(student.shape[0], device=student.device)
    total = student.new_zeros(())
    for low, high in bands:
        s = F.normalize(band_pass(student, low, high).flatten(1), dim=1)
        t = F.normalize(band_pass(teacher, low, high).flatten(1), dim=1)
        total = total + F.cross_entropy(s @ t.T / temperature, target)
    return total / len(bands)


def parameter_bytes(model: nn.Module, bytes_per_value: int = 2) -> int:
    """Size of the model's parameters and buffers at ``bytes_per_value`` (2 = fp16)."""
    count = sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())
    return count * bytes_per_value
