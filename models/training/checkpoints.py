"""Smaller training checkpoints for shipping beside the weights (resume in a later session).

A checkpoint dict holds ``model`` (a state dict), ``optimizer`` (AdamW: per-parameter
``exp_avg``/``exp_avg_sq``) and, for segmentation, ``best["model"]``. bfloat16 keeps float32's
exponent range, so the tiny second moments do not underflow; :meth:`Optimizer.load_state_dict`
and :meth:`Module.load_state_dict` cast bfloat16 back to the parameters' float32 on resume, so a
resumed run continues from values rounded to 8 significant bits (close to, not bit-identical
with, an uninterrupted run).
"""

from __future__ import annotations

from typing import Any

import torch


def _bf16(tensors: dict[str, Any]) -> dict[str, Any]:
    return {
        name: value.to(torch.bfloat16)
        if isinstance(value, torch.Tensor) and value.is_floating_point() and name != "step"
        else value
        for name, value in tensors.items()
    }


def compact_checkpoint(state: dict[str, Any], weights_bf16: bool = False) -> dict[str, Any]:
    """The checkpoint with the AdamW moments (and, if asked, the weights) as bfloat16.

    Args:
        state: Checkpoint dict with ``optimizer`` (and ``model``, optionally ``best["model"]``).
        weights_bf16: Also store ``model`` and ``best["model"]`` as bfloat16 (halves them).

    Returns:
        A new dict; ``state`` is not changed.
    """
    optimizer = dict(state["optimizer"])
    optimizer["state"] = {key: _bf16(value) for key, value in optimizer["state"].items()}
    out = {**state, "optimizer": optimizer}
    if weights_bf16:
        out["model"] = _bf16(state["model"])
        best = state.get("best")
        if isinstance(best, dict) and isinstance(best.get("model"), dict):
            out["best"] = {**best, "model": _bf16(best["model"])}
    return out
