"""The one place that turns a pipeline's ``device`` parameter into a torch device name."""

from __future__ import annotations

import torch

from models.errors import InputRejected


def resolve_device(choice: str) -> str:
    """Resolve ``"auto" | "cpu" | "cuda"`` to ``"cpu"`` or ``"cuda"``.

    Raises:
        InputRejected: ``"cuda"`` asked for where no CUDA device is available.
    """
    if choice == "cuda" and not torch.cuda.is_available():
        raise InputRejected("device='cuda' requested but no CUDA device is available")
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return choice
