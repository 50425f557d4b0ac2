"""GLFC-style global-local UNet for CBCT -> synthetic CT, and its plain-UNet baseline.

After "GLFC: Unified Global-Local Feature and Contrast Learning with Mamba-Enhanced UNet for
Synthetic CT Generation from CBCT": a high-resolution 2D UNet (local features from 3 x 3
convolutions) whose skip connections pass through state-space (Mamba) blocks, so that every
skip feature sees the whole slice (global features: scatter and cupping are slice-wide
artefacts). Here the network is 2.5D: ``2 * context + 1`` neighbouring CBCT slices in as
channels, one sCT slice out, predicted as a residual added to the centre CBCT slice.

:class:`SkipMamba` is a 2D selective-scan block in the manner of Vision Mamba / VMamba: the
feature map is flattened in four orders (rows and columns, each forwards and backwards), each
sequence goes through one Mamba-2 selective scan (:mod:`models.networks.selective_scan`: the
CUDA kernel when ``mamba_ssm`` is installed on a GPU, else an exact pure-PyTorch chunked scan),
and the four outputs are merged back. :func:`build_network` builds either architecture from a
JSON-compatible config (weights files store it), ``"glfc"``, ``"unet"`` (the same UNet with
plain identity skips, widened to about the same number of parameters) or ``"unet3d"`` (the plain
UNet with 3D convolutions on patches of slices: the 2.5D-vs-3D baseline).

Tensors are ``(batch, channels, rows, cols)`` (3D: ``(batch, channels, slices, rows, cols)``);
intensities are normalised HU (:data:`HU_SCALE`).
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from models.networks.selective_scan import selective_scan

HU_SCALE = 1000.0
"""Network intensity = HU / HU_SCALE (water 0, air -1, dense bone about 1.5-2)."""


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, channels), channels)


CONV: dict[int, type[nn.Conv2d] | type[nn.Conv3d]] = {2: nn.Conv2d, 3: nn.Conv3d}
UP: dict[int, type[nn.ConvTranspose2d] | type[nn.ConvTranspose3d]] = {
    2: nn.ConvTranspose2d,
    3: nn.ConvTranspose3d,
}
POOL = {2: F.max_pool2d, 3: F.max_pool3d}
"""Layers by spatial dimensions of a sample (2: a slice, 3: a patch of slices)."""


class ConvBlock(nn.Module):
    """Two 3 x 3 (x 3) convolutions with GroupNorm and SiLU, and a 1 x 1 (x 1) residual path."""

    def __init__(self, c_in: int, c_out: int, dims: int = 2) -> None:
        """Build the block.

        Args:
            c_in: Input channels.
            c_out: Output channels.
            dims: Spatial dimensions, 2 or 3.
        """
        super().__init__()
        conv = CONV[dims]
        self.body = nn.Sequential(
            conv(c_in, c_out, 3, padding=1, bias=False),
            _norm(c_out),
            nn.SiLU(),
            conv(c_out, c_out, 3, padding=1, bias=False),
            _norm(c_out),
        )
        self.skip = nn.Identity() if c_in == c_out else conv(c_in, c_out, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, c_in, *spatial)`` -> ``(B, c_out, *spatial)``."""
        return F.silu(self.body(x) + self.skip(x))


class SkipMamba(nn.Module):
    """Global block of a skip connection: a four-direction 2D selective scan (Mamba-2 style).

    ``out = x + gamma * proj(scan(x))`` with ``gamma`` starting at 0, so the block starts as
    the identity skip of a plain UNet and learns how much global context to add.
    """

    def __init__(
        self, channels: int, d_state: int = 16, head_dim: int = 16, groups: int | None = None
    ) -> None:
        """Build the block.

        Args:
            channels: Feature channels of the skip (a multiple of ``head_dim``).
            d_state: State size of each B/C group.
            head_dim: Channels per head.
            groups: Heads sharing one input/output projection (B, C) pair: Mamba-2's
                ``ngroups`` (1 there by default). ``None``: one pair per head (Mamba-1 style,
                the first shipped GLFC network).

        Raises:
            ValueError: If ``channels`` is not a multiple of ``head_dim`` or ``groups`` does
                not divide the number of heads.
        """
        super().__init__()
        if channels % head_dim:
            raise ValueError(f"channels {channels} must be a multiple of head_dim {head_dim}")
        self.heads, self.head_dim, self.d_state = channels // head_dim, head_dim, d_state
        self.groups = self.heads if groups is None else groups
        if self.groups < 1 or self.heads % self.groups:
            raise ValueError(f"{self.groups} B/C groups do not divide {self.heads} heads")
        self.norm = nn.LayerNorm(channels)
        self.in_proj = nn.Linear(channels, 2 * channels, bias=False)
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, groups=channels)
        self.x_proj = nn.Linear(channels, 4 * (self.heads + 2 * self.groups * d_state), bias=False)
        # Mamba's initialisation: step sizes log-spaced over 1e-3..1e-1 across heads (the
        # slowest head decays by e^-0.001 per token: memory over the whole slice), A = 1..heads
        dt = torch.logspace(-3.0, -1.0, self.heads)
        self.dt_bias = nn.Parameter((dt + torch.log(-torch.expm1(-dt))).repeat(4, 1))
        self.a_log = nn.Parameter(torch.log(torch.arange(1.0, self.heads + 1)).repeat(4, 1))
        self.d = nn.Parameter(torch.ones(channels))
        self.out_norm = nn.LayerNorm(channels)
        self.out_proj = nn.Linear(channels, channels, bias=False)
        self.gamma = nn.Parameter(torch.zeros(1))

    @staticmethod
    def _order(u: torch.Tensor, k: int) -> torch.Tensor:
        """``(B, H, W, C)`` -> ``(B, H*W, C)`` in scan order ``k``.

        Orders: 0 rows, 1 rows reversed, 2 columns, 3 columns reversed.
        """
        seq = u.flatten(1, 2) if k < 2 else u.transpose(1, 2).flatten(1, 2)
        return seq.flip(1) if k % 2 else seq

    def _merge(self, ys: list[torch.Tensor], h: int, w: int) -> torch.Tensor:
        """Undo :meth:`_order` and sum: four ``(B, H*W, C)`` -> ``(B, H, W, C)``."""
        bsz, _, ch = ys[0].shape
        rows = ys[0] + ys[1].flip(1)
        cols = ys[2] + ys[3].flip(1)
        return rows.reshape(bsz, h, w, ch) + cols.reshape(bsz, w, h, ch).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` -> ``(B, C, H, W)``."""
        bsz, ch, h, w = x.shape
        u, z = self.in_proj(self.norm(x.permute(0, 2, 3, 1))).chunk(2, dim=-1)
        u = F.silu(self.conv(u.permute(0, 3, 1, 2))).permute(0, 2, 3, 1)  # (B, H, W, C)
        heads, dim, n, g = self.heads, self.head_dim, self.d_state, self.groups
        params = self.x_proj(u).float()  # (B, H, W, 4 * (heads + 2 groups n))
        ys = []
        for k, p_k in enumerate(params.chunk(4, dim=-1)):
            seq, p = self._order(u, k), self._order(p_k, k)
            dt = F.softplus(p[..., :heads] + self.dt_bias[k])
            b = p[..., heads : heads + g * n].reshape(bsz, -1, g, n)
            c = p[..., heads + g * n :].reshape(bsz, -1, g, n)
            y = selective_scan(seq.float().reshape(bsz, -1, heads, dim), dt, self.a_log[k], b, c)
            ys.append(y.reshape(bsz, -1, ch).to(seq.dtype))
        y = self._merge(ys, h, w) + u * self.d
        y = self.out_proj(self.out_norm(y) * F.silu(z))
        return x + self.gamma * y.permute(0, 3, 1, 2)


class SCTUNet(nn.Module):
    """UNet predicting an HU correction; optional :class:`SkipMamba` in the skips (2.5D only).

    2.5D (``dims = 2``): ``forward(x)``, ``x`` ``(B, 2 * context + 1, H, W)`` normalised CBCT
    slices, returns ``(B, 1, H, W)``: the centre slice plus the predicted correction.
    3D (``dims = 3``, ``context = 0``): ``x`` ``(B, 1, D, H, W)``, a patch of slices, returns
    the patch plus its correction, ``(B, 1, D, H, W)``. Spatial sizes must be multiples of
    ``2 ** (levels - 1)``; intensities are normalised HU.
    """

    def __init__(
        self,
        context: int = 2,
        features: tuple[int, ...] = (16, 32, 64, 128),
        global_skips: tuple[bool, ...] = (False, False, True, True),
        d_state: int = 16,
        state_groups: int | None = None,
        dims: int = 2,
    ) -> None:
        """Build the network.

        Args:
            context: Neighbouring slices on each side of the centre slice (0 in 3D).
            features: Channels per resolution level (first: full resolution).
            global_skips: Per level, whether its skip passes through a :class:`SkipMamba`
                (the deepest level is the bottleneck: there the block follows the encoder).
            d_state: State size of the selective scans.
            state_groups: B/C groups per :class:`SkipMamba` (``None``: one per head).
            dims: Spatial dimensions of a sample: 2 (slices) or 3 (patches).

        Raises:
            ValueError: Inconsistent flags, or scan blocks or context asked for in 3D.
        """
        super().__init__()
        if len(global_skips) != len(features):
            raise ValueError("global_skips needs one flag per level")
        if dims not in CONV or (dims == 3 and (context or any(global_skips))):
            raise ValueError("dims is 2, or 3 with context 0 and no scan blocks")
        self.context, self.dims = context, dims
        c_in = 2 * context + 1
        self.encoders = nn.ModuleList()
        for c_out in features:
            self.encoders.append(ConvBlock(c_in, c_out, dims))
            c_in = c_out
        self.skips = nn.ModuleList(
            SkipMamba(f, d_state, groups=state_groups) if g else nn.Identity()
            for f, g in zip(features, global_skips, strict=True)
        )
        self.ups = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for lo, hi in itertools.pairwise(features):
            self.ups.append(UP[dims](hi, lo, 2, stride=2))
            self.decoders.append(ConvBlock(2 * lo, lo, dims))
        self.head = CONV[dims](features[0], 1, 1)
        nn.init.zeros_(self.head.weight)
        if self.head.bias is not None:
            nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 2 context + 1, H, W)`` or ``(B, 1, D, H, W)`` -> the sCT, ``(B, 1, ...)``."""
        centre = x[:, self.context : self.context + 1]
        skips = []
        h = x
        for level, (enc, skip) in enumerate(zip(self.encoders, self.skips, strict=True)):
            if level:
                h = POOL[self.dims](h, 2)
            h = enc(h)
            skips.append(skip(h))
        h = skips[-1]
        for level in range(len(self.decoders) - 1, -1, -1):
            h = self.ups[level](h)
            h = self.decoders[level](torch.cat([h, skips[level]], dim=1))
        return centre + self.head(h)


DEFAULT_CONFIGS: dict[str, dict[str, Any]] = {
    "glfc": {
        "arch": "glfc",
        "context": 2,
        "features": [24, 48, 80, 112],
        "global_skips": [False, False, True, True],
        "d_state": 16,
        "state_groups": 1,
    },
    "unet": {
        "arch": "unet",
        "context": 2,
        "features": [24, 48, 80, 144],
        "global_skips": [False, False, False, False],
        "d_state": 16,
    },
    "unet3d": {
        "arch": "unet3d",
        "context": 0,
        "features": [16, 32, 48, 80],
        "global_skips": [False, False, False, False],
        "patch_slices": 16,
    },
}
"""Shipped configurations. GLFC: the plain UNet's widths at full, 1/2 and 1/4 resolution, a
narrower bottleneck (112 channels instead of 144) and selective-scan skips at 1/4 and 1/8
resolution (on 128 x 128 slices: 32 x 32 and 16 x 16 tokens; at 1/2 resolution the
pure-PyTorch scan cost 1.6 s of a batch-8 training step on one CPU thread) whose B/C
projections are shared by all heads of a block (Mamba-2's default ``ngroups = 1``): 0.753 M
parameters. The plain UNet: 0.774 M parameters (3 % more than GLFC). ``unet3d``: the plain
UNet in 3D (``dims = 3``, 0.781 M parameters), trained and
applied on patches of ``patch_slices`` axial slices (the 3D side of issue 7's 2.5D-or-3D
measurement). Weights files store their own config, so the first GLFC network (16/32/64/128,
one B/C pair per head, 0.738 M) still loads."""


def build_network(config: dict[str, Any]) -> SCTUNet:
    """Build the network a config describes (``arch``, ``context``, ``features``...).

    Raises:
        ValueError: Unknown architecture or inconsistent fields.
    """
    arch = config.get("arch")
    if arch not in DEFAULT_CONFIGS:
        raise ValueError(f"unknown sCT architecture {arch!r} (known: {sorted(DEFAULT_CONFIGS)})")
    if arch == "unet3d" and int(config["patch_slices"]) % 2 ** (len(config["features"]) - 1):
        raise ValueError("patch_slices must be a multiple of 2 ** (levels - 1)")
    return SCTUNet(
        context=int(config["context"]),
        features=tuple(int(f) for f in config["features"]),
        global_skips=tuple(bool(g) for g in config["global_skips"]),
        d_state=int(config.get("d_state", 16)),
        state_groups=None if config.get("state_groups") is None else int(config["state_groups"]),
        dims=3 if arch == "unet3d" else 2,
    )


def parameter_count(network: nn.Module) -> int:
    """Trainable parameters."""
    return sum(p.numel() for p in network.parameters() if p.requires_grad)
