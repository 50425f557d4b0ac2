"""The files every training command writes: output folder, atomic saves, weights + sha256."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from service.errors import InvalidParameters

CHECKPOINT = "checkpoint.pt"
"""Name of the resumable training state in the output folder."""


def checkpoint_path(out: Path, resume: bool) -> Path:
    """Create ``out`` and return its checkpoint path, refusing a run that would clobber one.

    Raises:
        InvalidParameters: ``--resume`` without a checkpoint, or a checkpoint there without it.
    """
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = out / CHECKPOINT
    if resume and not checkpoint.exists():
        raise InvalidParameters(f"--resume: no {checkpoint}")
    if not resume and checkpoint.exists():
        raise InvalidParameters(f"{checkpoint} exists: pass --resume or use another --out")
    return checkpoint


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary name beside ``path``, then rename (no half-written file)."""
    import torch

    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def atomic_json(obj: Any, path: Path) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def save_weights(state_dict: Any, path: Path) -> str:
    """Save a state dict atomically with a ``<name>.sha256`` file beside it; return the digest."""
    atomic_torch_save(state_dict, path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    (path.parent / (path.name + ".sha256")).write_text(f"{digest}  {path.name}\n")
    return digest
