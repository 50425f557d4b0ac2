"""Streaming sliding-window inference: Gaussian-blended logits -> class map, in a rolling slab.

MONAI's ``sliding_window_inference`` allocates the blended logits of the whole volume,
``(1, C, D0, D1, D2)`` float32, plus a count map, before the argmax: 10 labels on a
512 x 512 x 800 grid are 9.2 GB. :func:`sliding_window_classes` places the windows exactly as
MONAI does (same padding of volumes smaller than the window, ``_get_scan_interval``,
``dense_patch_slices``, ``compute_importance_map``), but visits them in order of their start
along one *streamed* axis and accumulates weighted logits and weights only in a ring buffer
(a slab) as long as the window along that axis. Before a window starting at row ``s`` is added,
every row ``< s`` is final (no later window touches it): those rows are divided by their
summed weights, reduced by argmax to ``uint8``/``uint16`` classes, written to the output and
their slab rows zeroed for reuse. The slab never holds more than ``window`` rows.

Along streamed axis 0 the windows are visited in MONAI's own order (its window list runs with
axis 0 outermost), so every voxel sums the same products in the same order: the logits are
bitwise MONAI's (fp32) and so is the argmax. Along another axis only the order of the
floating-point sum differs, so the classes agree except at voxels whose two best logits lie
within rounding of each other.

Tensors are ``(batch, channel, axis 0, axis 1, axis 2)``; all units are voxels.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from monai.data.utils import compute_importance_map, dense_patch_slices
from monai.inferers.utils import _get_scan_interval

from models.errors import InputRejected


@dataclass(frozen=True)
class StreamStats:
    """What one streamed inference held and did.

    Attributes:
        axis: The streamed axis (0, 1 or 2 of the spatial axes).
        windows: Number of windows (network inputs of one patch each).
        scan_interval: Step between window starts along each axis (MONAI's, voxels).
        slab_rows: Rows of the ring buffer along the streamed axis (= the window's extent).
        max_live_rows: Most rows holding unfinished sums at any time (<= ``slab_rows``).
        slab_bytes: Bytes of the ring buffers (logits ``C x slab`` plus weights ``1 x slab``).
        padded_shape: Spatial shape after padding up to the window (= input when larger).
    """

    axis: int
    windows: int
    scan_interval: tuple[int, int, int]
    slab_rows: int
    max_live_rows: int
    slab_bytes: int
    padded_shape: tuple[int, int, int]


def monai_padding(shape: tuple[int, ...], patch: tuple[int, int, int]) -> list[tuple[int, int]]:
    """Per-axis ``(before, after)`` padding MONAI applies when the volume is smaller.

    Args:
        shape: Spatial shape ``(D0, D1, D2)``.
        patch: Window ``(p0, p1, p2)``.

    Returns:
        ``[(before, after)] * 3``: ``diff = max(p - D, 0)``, ``before = diff // 2``.
    """
    out = []
    for n, p in zip(shape, patch, strict=True):
        diff = max(p - n, 0)
        out.append((diff // 2, diff - diff // 2))
    return out


def window_starts(
    shape: tuple[int, int, int], patch: tuple[int, int, int], overlap: float
) -> tuple[list[tuple[int, int, int]], tuple[int, int, int]]:
    """Window start corners, in MONAI's order, on a grid at least as large as the window.

    Args:
        shape: Spatial shape, every axis ``>= patch``.
        patch: Window (voxels).
        overlap: Overlap fraction in ``[0, 1)``.

    Returns:
        ``(starts, scan_interval)``: the corners of ``dense_patch_slices`` (axis 0 outermost)
        and the step per axis.
    """
    interval = _get_scan_interval(shape, patch, 3, (overlap,) * 3)
    slices = dense_patch_slices(shape, patch, interval)
    starts = [(int(s[0].start), int(s[1].start), int(s[2].start)) for s in slices]
    return starts, (int(interval[0]), int(interval[1]), int(interval[2]))


def _ring(start: int, stop: int, size: int) -> Iterator[tuple[slice, slice]]:
    """Global rows ``[start, stop)`` (``stop - start <= size``) as ring pieces.

    Yields:
        ``(ring_slice, local_slice)``: rows of the ring buffer and the matching rows counted
        from ``start``.
    """
    pos, done = start % size, 0
    while done < stop - start:
        n = min(stop - start - done, size - pos)
        yield slice(pos, pos + n), slice(done, done + n)
        pos, done = 0, done + n


def _along(axis: int, rows: slice, rest: tuple[slice, ...]) -> tuple[slice, ...]:
    """Spatial index with ``rows`` on ``axis`` and ``rest`` on the other axes."""
    index = list(rest)
    index[axis] = rows
    return tuple(index)


def sliding_window_classes(
    image: torch.Tensor,
    predictor: Callable[[torch.Tensor], Any],
    patch: tuple[int, int, int],
    *,
    overlap: float,
    sw_batch: int,
    mode: Literal["gaussian", "constant"] = "gaussian",
    sigma_scale: float = 0.125,
    cval: float | None = None,
    axis: int | None = None,
) -> tuple[npt.NDArray[np.unsignedinteger[Any]], StreamStats]:
    """Blended sliding-window logits reduced to classes without a full logits buffer.

    Windows, padding and weights are MONAI's ``sliding_window_inference(image, patch,
    sw_batch, predictor, overlap, mode, sigma_scale, padding_mode="constant", cval)``; the
    argmax of its output is what this returns (see the module docstring for the exactness).
    The caller chooses autocast and ``torch.inference_mode``; logits are blended in float32
    (a bfloat16 network output is widened, weighted and summed in one fused step, so only
    float32 logits are bitwise MONAI's).

    Args:
        image: ``(1, 1, D0, D1, D2)`` float image (the network's input units).
        predictor: Maps ``(B, 1, p0, p1, p2)`` to logits ``(B, C, p0, p1, p2)``.
        patch: Window ``(p0, p1, p2)`` (voxels).
        overlap: Overlap fraction between windows, ``[0, 1)``.
        sw_batch: Windows per predictor call.
        mode: ``"gaussian"`` (sigma ``sigma_scale`` x window) or ``"constant"`` weights.
        sigma_scale: Gaussian sigma as a fraction of the window.
        cval: Padding value for volumes smaller than the window; default the image minimum.
        axis: Streamed spatial axis; default the longest of the padded grid (lowest on ties),
            which makes the slab smallest.

    Returns:
        ``(classes, stats)``: class indices ``(D0, D1, D2)`` (``uint8`` for at most 256
        classes, else ``uint16``; class ``c`` is output channel ``c``) and :class:`StreamStats`.

    Raises:
        InputRejected: The predictor returned no tensor, or logits not of the window's size.
        ValueError: A bad ``image`` shape, ``overlap``, ``sw_batch`` or ``axis``.
    """
    if image.ndim != 5 or image.shape[0] != 1:
        raise ValueError(f"image must be (1, channels, D0, D1, D2), got {tuple(image.shape)}")
    if not 0.0 <= overlap < 1.0 or sw_batch < 1:
        raise ValueError(f"need 0 <= overlap < 1 and sw_batch >= 1, got {overlap}, {sw_batch}")
    shape = (int(image.shape[2]), int(image.shape[3]), int(image.shape[4]))
    pads = monai_padding(shape, patch)
    if any(b or a for b, a in pads):
        value = float(image.min()) if cval is None else cval
        flat = [v for b, a in reversed(pads) for v in (b, a)]  # F.pad: last axis first
        image = F.pad(image, flat, mode="constant", value=value)
    grid = (int(image.shape[2]), int(image.shape[3]), int(image.shape[4]))
    if axis is None:
        axis = int(np.argmax(grid))  # first of the longest
    if axis not in (0, 1, 2):
        raise ValueError(f"axis must be 0, 1 or 2, got {axis}")
    starts, interval = window_starts(grid, patch, overlap)
    starts = sorted(starts, key=lambda c: c[axis])  # stable: MONAI's order when axis == 0
    weight = compute_importance_map(
        patch, mode=mode, sigma_scale=sigma_scale, device=image.device, dtype=image.dtype
    )
    slab: _Slab | None = None
    for first in range(0, len(starts), sw_batch):
        batch = starts[first : first + sw_batch]
        windows = [tuple(slice(s, s + p) for s, p in zip(c, patch, strict=True)) for c in batch]
        if len(windows) > 1:
            data = torch.cat([image[(slice(None), slice(None), *w)] for w in windows])
        else:
            data = image[(slice(None), slice(None), *windows[0])]
        logits = predictor(data)
        if not isinstance(logits, torch.Tensor):
            raise InputRejected("the network returned no single logits tensor")
        if tuple(logits.shape[2:]) != patch or logits.shape[0] != len(windows):
            raise InputRejected(
                f"the network maps a {list(patch)} window to logits {list(logits.shape)}; "
                "streamed inference needs logits of the window's size"
            )
        exact = logits.dtype == image.dtype
        if exact:
            logits *= weight  # in place, then summed: MONAI's arithmetic
        if slab is None:
            slab = _Slab(int(logits.shape[1]), grid, shape, pads, axis, patch[axis], image)
        for window_logits, window in zip(logits, windows, strict=True):
            slab.add(window, window_logits, weight, weighted=exact)
    if slab is None:  # pragma: no cover - dense_patch_slices always yields a window
        raise ValueError("no window")
    slab.finalise(grid[axis])
    stats = StreamStats(
        axis=axis,
        windows=len(starts),
        scan_interval=interval,
        slab_rows=slab.rows,
        max_live_rows=slab.max_live,
        slab_bytes=slab.nbytes,
        padded_shape=grid,
    )
    return slab.out, stats


class _Slab:
    """Ring buffers of summed weighted logits and weights along the streamed axis.

    Global row ``r`` (padded grid, streamed axis) lives in ring row ``r % rows``. Rows below
    ``done`` are final and written to ``out`` (the unpadded class map).
    """

    def __init__(
        self,
        n_classes: int,
        grid: tuple[int, int, int],
        shape: tuple[int, int, int],
        pads: list[tuple[int, int]],
        axis: int,
        rows: int,
        like: torch.Tensor,
    ) -> None:
        ring = _slab_shape(grid, axis, rows)
        self.logits = torch.zeros((n_classes, *ring), dtype=like.dtype, device=like.device)
        self.weights = torch.zeros(ring, dtype=like.dtype, device=like.device)
        small = n_classes <= 256
        self.index_dtype = torch.uint8 if small else torch.int32
        self.out: npt.NDArray[np.unsignedinteger[Any]] = np.zeros(
            shape, dtype=np.uint8 if small else np.uint16
        )
        self.shape, self.pads, self.axis, self.rows = shape, pads, axis, rows
        self.crop = tuple(slice(b, b + n) for (b, _), n in zip(pads, shape, strict=True))
        self.done = self.stop = self.max_live = 0
        self.nbytes = (self.logits.numel() + self.weights.numel()) * self.logits.element_size()

    def add(
        self,
        window: tuple[slice, ...],
        logits: torch.Tensor,
        weight: torch.Tensor,
        *,
        weighted: bool,
    ) -> None:
        """Add one window's logits ``(C, p0, p1, p2)`` times its weights ``(p0, p1, p2)``.

        Windows must come in order of their start along the streamed axis: rows before this
        window's start are finalised first (no later window touches them).

        Args:
            window: The window's spatial slices on the padded grid.
            logits: Already weighted (float32, MONAI's arithmetic) when ``weighted``; else
                raw (e.g. bfloat16), multiplied and summed in float32 in one fused step.
            weight: The window's weights.
            weighted: See ``logits``.
        """
        start = int(window[self.axis].start)
        if start > self.done:
            self.finalise(start)
        for ring_rows, local in _ring(start, start + self.rows, self.rows):
            target = _along(self.axis, ring_rows, window)
            part = _along(self.axis, local, (slice(None),) * 3)
            if weighted:
                self.logits[(slice(None), *target)] += logits[(slice(None), *part)]
            else:
                self.logits[(slice(None), *target)].addcmul_(
                    logits[(slice(None), *part)], weight[part]
                )
            self.weights[target] += weight[part]
        self.stop = max(self.stop, start + self.rows)
        self.max_live = max(self.max_live, self.stop - self.done)

    def finalise(self, upto: int) -> None:
        """Divide, argmax and write global rows ``[done, upto)``; zero their ring rows."""
        before = self.pads[self.axis][0]
        for ring_rows, local in _ring(self.done, upto, self.rows):
            spatial = _along(self.axis, ring_rows, (slice(None),) * 3)
            block = self.logits[(slice(None), *spatial)]
            classes = _blend_argmax(block, self.weights[spatial], self.index_dtype)
            block.zero_()
            self.weights[spatial].zero_()
            g0 = self.done + local.start  # global rows of this piece
            c0 = max(g0, before)  # ... the part inside the unpadded volume
            c1 = min(self.done + local.stop, before + self.shape[self.axis])
            if c0 < c1:
                piece = classes[_along(self.axis, slice(c0 - g0, c1 - g0), self.crop)]
                dst = _along(self.axis, slice(c0 - before, c1 - before), (slice(None),) * 3)
                self.out[dst] = piece.cpu().numpy()
        self.done = upto


def _slab_shape(grid: tuple[int, int, int], axis: int, rows: int) -> tuple[int, int, int]:
    """The spatial shape of the ring buffer: ``grid`` with ``rows`` on ``axis``."""
    out = list(grid)
    out[axis] = rows
    return (out[0], out[1], out[2])


def _blend_argmax(logits: torch.Tensor, weights: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``argmax_c(logits[c] / weights)``, first maximum on ties (as ``torch.argmax``).

    One pass per channel (several times faster on CPU than ``argmax`` over a leading channel
    axis); divides ``logits`` in place as MONAI does before its argmax.

    Args:
        logits: ``(C, ...)`` summed weighted logits, float32 (overwritten).
        weights: ``(...)`` summed weights (> 0).
        dtype: Integer dtype of the result.

    Returns:
        ``(...)`` class indices.
    """
    logits[0] /= weights
    best = logits[0]
    index = torch.zeros(best.shape, dtype=dtype, device=best.device)
    better = torch.empty(best.shape, dtype=torch.bool, device=best.device)
    for c in range(1, logits.shape[0]):
        channel = logits[c]
        channel /= weights
        torch.gt(channel, best, out=better)
        torch.maximum(best, channel, out=best)
        index.masked_fill_(better, c)
    return index
