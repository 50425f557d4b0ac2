"""Selective state-space scan (Mamba-2 "SSD" form) in pure PyTorch, with an optional CUDA kernel.

The recurrence, per batch element, head ``h`` and time step ``t`` (state ``s_t`` of shape
``(head_dim, d_state)``)::

    s_t = exp(a_t) * s_{t-1} + x_t b_t^T        (a_t <= 0: the input-dependent decay dt_t * A_h)
    y_t = s_t c_t

is what Mamba-2's selective scan computes (``x`` already multiplied by ``dt``). The CUDA/Triton
kernel ``mamba_ssm.ops.triton.ssd_combined.mamba_chunk_scan_combined`` is used when the package
is installed and the tensors are on a GPU; otherwise :func:`ssd_scan` evaluates the same
recurrence exactly in chunks (the "minimal SSD" algorithm of Dao and Gu, 2024: quadratic within a
chunk, a short recurrence between chunks), which runs on any device. :func:`sequential_scan` is
the step-by-step reference used by the tests.

``b`` and ``c`` may be shared by groups of heads, as in Mamba-2 (``ngroups``, default 1 there):
their third axis is then ``groups`` (a divisor of ``heads``) instead of ``heads``, and head
``h`` reads group ``h // (heads // groups)``, as ``mamba_ssm`` does.
"""

from __future__ import annotations

import importlib.util
from functools import lru_cache

import torch
import torch.nn.functional as F

DEFAULT_CHUNK = 32
"""Chunk length of :func:`ssd_scan` (cost ~ L * chunk per head and state dimension)."""


@lru_cache(maxsize=1)
def mamba_kernel_installed() -> bool:
    """True when the ``mamba_ssm`` package (CUDA selective-scan kernels) can be imported."""
    return importlib.util.find_spec("mamba_ssm") is not None


def backend_for(device: torch.device) -> str:
    """``"mamba_ssm"`` on CUDA with the kernels installed, else ``"torch-ssd"``."""
    return "mamba_ssm" if device.type == "cuda" and mamba_kernel_installed() else "torch-ssd"


def _per_head(t: torch.Tensor, heads: int) -> torch.Tensor:
    """``(batch, length, groups, d_state)`` -> ``(batch, length, heads, d_state)``.

    Head ``h`` reads group ``h // (heads // groups)`` (consecutive heads share a group).

    Raises:
        ValueError: If ``groups`` does not divide ``heads``.
    """
    groups = t.shape[2]
    if groups == heads:
        return t
    if heads % groups:
        raise ValueError(f"{groups} B/C groups do not divide {heads} heads")
    return t.repeat_interleave(heads // groups, dim=2)


def _segsum(x: torch.Tensor) -> torch.Tensor:
    """``out[..., i, j] = sum(x[..., j+1 : i+1])`` for ``j <= i``, ``-inf`` above the diagonal.

    Args:
        x: ``(..., T)``.

    Returns:
        ``(..., T, T)``.
    """
    t = x.size(-1)
    x = x[..., None].expand(*x.shape, t)
    lower = torch.tril(torch.ones(t, t, dtype=torch.bool, device=x.device), diagonal=-1)
    x = x.masked_fill(~lower, 0.0)
    out = torch.cumsum(x, dim=-2)
    keep = torch.tril(torch.ones(t, t, dtype=torch.bool, device=x.device), diagonal=0)
    return out.masked_fill(~keep, float("-inf"))


def ssd_scan(
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    c: torch.Tensor,
    chunk: int = DEFAULT_CHUNK,
) -> torch.Tensor:
    """Exact chunked selective scan (pure PyTorch).

    Args:
        x: Inputs times ``dt``, ``(batch, length, heads, head_dim)``.
        a: Log decays ``dt * A`` (<= 0), ``(batch, length, heads)``.
        b: Input projections, ``(batch, length, heads or groups, d_state)``.
        c: Output projections, ``(batch, length, heads or groups, d_state)``.
        chunk: Chunk length; the sequence is zero-padded to a multiple of it (padding steps
            have zero input and zero decay, so they change nothing before them).

    Returns:
        ``y``, ``(batch, length, heads, head_dim)``, in float32.
    """
    length, heads = x.shape[1], x.shape[2]
    pad = (-length) % chunk
    x, a = x.float(), a.float()
    b, c = (_per_head(t.float(), heads) for t in (b, c))
    if pad:
        x = F.pad(x, (0, 0, 0, 0, 0, pad))
        a = F.pad(a, (0, 0, 0, pad))
        b = F.pad(b, (0, 0, 0, 0, 0, pad))
        c = F.pad(c, (0, 0, 0, 0, 0, pad))
    bsz, total, heads, dim = x.shape
    n = total // chunk
    x = x.reshape(bsz, n, chunk, heads, dim)
    b = b.reshape(bsz, n, chunk, heads, -1)
    c = c.reshape(bsz, n, chunk, heads, -1)
    a = a.reshape(bsz, n, chunk, heads).permute(0, 3, 1, 2)  # (b, h, n, l)
    a_cum = torch.cumsum(a, dim=-1)
    decay = torch.exp(_segsum(a))  # (b, h, n, l, l)
    scores = torch.einsum("bclhn,bcshn->bhcls", c, b) * decay
    y_diag = torch.einsum("bhcls,bcshp->bclhp", scores, x)
    decay_states = torch.exp(a_cum[..., -1:] - a_cum)
    states = torch.einsum("bclhn,bhcl,bclhp->bchpn", b, decay_states, x)
    states = torch.cat([torch.zeros_like(states[:, :1]), states], dim=1)
    decay_chunk = torch.exp(_segsum(F.pad(a_cum[..., -1], (1, 0))))
    states = torch.einsum("bhzc,bchpn->bzhpn", decay_chunk, states)[:, :-1]
    y_off = torch.einsum("bclhn,bchpn,bhcl->bclhp", c, states, torch.exp(a_cum))
    y = (y_diag + y_off).reshape(bsz, total, heads, dim)
    return y[:, :length]


def sequential_scan(
    x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor
) -> torch.Tensor:
    """The same recurrence one step at a time (reference for tests; slow).

    Args:
        x: ``(batch, length, heads, head_dim)``.
        a: ``(batch, length, heads)``.
        b: ``(batch, length, heads or groups, d_state)``.
        c: ``(batch, length, heads or groups, d_state)``.

    Returns:
        ``(batch, length, heads, head_dim)``.
    """
    bsz, length, heads, dim = x.shape
    b, c = _per_head(b, heads), _per_head(c, heads)
    state = torch.zeros(bsz, heads, dim, b.shape[-1], dtype=torch.float64)
    out = []
    for t in range(length):
        state = torch.exp(a[:, t].double())[..., None, None] * state + torch.einsum(
            "bhp,bhn->bhpn", x[:, t].double(), b[:, t].double()
        )
        out.append(torch.einsum("bhpn,bhn->bhp", state, c[:, t].double()))
    return torch.stack(out, dim=1).float()


def selective_scan(
    x: torch.Tensor, dt: torch.Tensor, a_log: torch.Tensor, b: torch.Tensor, c: torch.Tensor
) -> torch.Tensor:
    """Mamba-2 selective scan: the CUDA kernel when available, else :func:`ssd_scan`.

    Args:
        x: Inputs, ``(batch, length, heads, head_dim)``.
        dt: Positive step sizes, ``(batch, length, heads)``.
        a_log: ``log(-A)`` per head, ``(heads,)`` (``A = -exp(a_log) < 0``).
        b: ``(batch, length, heads or groups, d_state)`` (groups: Mamba-2's ``ngroups``).
        c: ``(batch, length, heads or groups, d_state)``.

    Returns:
        ``y``, ``(batch, length, heads, head_dim)``.
    """
    a = -torch.exp(a_log.float())
    if backend_for(x.device) == "mamba_ssm":  # pragma: no cover - needs CUDA + mamba_ssm
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

        y: torch.Tensor = mamba_chunk_scan_combined(
            x.contiguous(), dt.contiguous(), a, b.contiguous(), c.contiguous(), chunk_size=64
        )
        return y
    return ssd_scan(x * dt[..., None], dt * a, b, c)
