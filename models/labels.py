"""Label maps: integer voxels that name structures, on the grid of the image they label.

A :class:`LabelMap` is a :class:`~models.volume.Volume` (same conventions: ``array[k, j, i]``,
affine ``(k, j, i, 1)`` -> LPS mm) whose array holds integer label values: ``0`` is background,
every other value present must be declared by a :class:`LabelInfo` (value, name, optional
SNOMED-CT category/type codes and display colour). Nothing here resamples; label maps that have
to change grid are resampled with nearest neighbour elsewhere (never interpolated).

Numpy only: no DICOM or file access (the writers live in ``service/io``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from models.errors import InputRejected
from models.volume import Volume

MAX_LABEL_VALUE = 65535
"""Largest label value (16-bit unsigned, as DICOM SEG label maps and most tools store them)."""

_CHUNK_VOXELS = 1 << 24
"""Voxels counted per step, so counting never copies a whole large array to int64."""


@dataclass(frozen=True)
class CodedTerm:
    """A coded concept (DICOM code sequence item), e.g. SNOMED-CT ``("10200004", "SCT", "Liver")``.

    Attributes:
        value: Code value.
        scheme: Coding scheme designator (``"SCT"`` for SNOMED-CT, ``"DCM"``...).
        meaning: Human-readable code meaning.
    """

    value: str
    scheme: str
    meaning: str

    def __post_init__(self) -> None:
        """Refuse empty parts."""
        if not (self.value and self.scheme and self.meaning):
            raise InputRejected(f"a code needs value, scheme and meaning, got {self}")


TISSUE = CodedTerm("85756007", "SCT", "Tissue")
"""Default segmented property category and type when a label declares none."""


@dataclass(frozen=True)
class LabelInfo:
    """One declared label value.

    Attributes:
        value: Voxel value, ``1..65535`` (``0`` is background and is never declared).
        name: Label name, e.g. ``"Mandible"``; unique within a label map.
        category: Segmented property category (SNOMED-CT), e.g. ``("123037004", "SCT",
            "Anatomical Structure")``; ``None`` -> :data:`TISSUE` in DICOM outputs.
        type: Segmented property type (SNOMED-CT), e.g. ``("91609006", "SCT", "Mandible")``;
            ``None`` -> :data:`TISSUE` in DICOM outputs.
        colour: Display colour as sRGB ``(r, g, b)``, each ``0..255``; ``None`` for none.
    """

    value: int
    name: str
    category: CodedTerm | None = None
    type: CodedTerm | None = None
    colour: tuple[int, int, int] | None = None

    def __post_init__(self) -> None:
        """Check the value range, the name and the colour."""
        if isinstance(self.value, bool) or not isinstance(self.value, int | np.integer):
            raise InputRejected(f"label value must be an integer, got {self.value!r}")
        if not 1 <= int(self.value) <= MAX_LABEL_VALUE:
            raise InputRejected(
                f"label value {self.value} ({self.name!r}) is outside 1..{MAX_LABEL_VALUE} "
                "(0 is background)"
            )
        object.__setattr__(self, "value", int(self.value))
        if not self.name.strip():
            raise InputRejected(f"label {self.value} has an empty name")
        if self.colour is not None:
            if len(self.colour) != 3 or not all(0 <= int(c) <= 255 for c in self.colour):
                raise InputRejected(
                    f"label {self.name!r}: colour must be (r, g, b) in 0..255, got {self.colour}"
                )
            r, g, b = (int(c) for c in self.colour)
            object.__setattr__(self, "colour", (r, g, b))

    def as_json(self) -> dict[str, Any]:
        """JSON-compatible description (codes as ``[value, scheme, meaning]``)."""

        def code(term: CodedTerm | None) -> list[str] | None:
            return None if term is None else [term.value, term.scheme, term.meaning]

        return {
            "value": self.value,
            "name": self.name,
            "category": code(self.category),
            "type": code(self.type),
            "colour": None if self.colour is None else list(self.colour),
        }


@dataclass(frozen=True)
class LabelVolume:
    """Size of one label.

    Attributes:
        value: Label value.
        voxel_count: Number of voxels with that value.
        volume_ml: ``voxel_count`` times the voxel volume, in mL (= cm³ = 1000 mm³).
    """

    value: int
    voxel_count: int
    volume_ml: float


def _value_counts(array: npt.NDArray[Any]) -> npt.NDArray[np.int64]:
    """Voxel count of every value ``0..max``, counted a chunk of slices at a time.

    Raises:
        InputRejected: Negative values or values above :data:`MAX_LABEL_VALUE`.
    """
    if array.size == 0:
        return np.zeros(1, dtype=np.int64)
    lo, hi = int(array.min()), int(array.max())
    if lo < 0 or hi > MAX_LABEL_VALUE:
        bad = sorted({v for v in (lo, hi) if v < 0 or v > MAX_LABEL_VALUE})
        raise InputRejected(
            f"label map holds values {bad} outside 0..{MAX_LABEL_VALUE} (0 is background)"
        )
    counts = np.zeros(hi + 1, dtype=np.int64)
    per_slice = max(1, int(np.prod(array.shape[1:])))
    step = max(1, _CHUNK_VOXELS // per_slice)
    for k in range(0, array.shape[0], step):
        block = np.asarray(array[k : k + step]).ravel()
        counts += np.bincount(block, minlength=hi + 1)
    return counts


@dataclass(frozen=True)
class LabelMap(Volume):
    """An integer label map on an image grid.

    Attributes:
        array: Integer label values, shape ``(n_slices, n_rows, n_columns)`` indexed
            ``[k, j, i]``; ``0`` = background. Boolean and floating arrays are refused.
        affine: 4x4, index ``(k, j, i, 1)`` -> LPS mm (the grid of the labelled image).
        modality: ``"SEG"`` by convention.
        units: ``""``.
        frame_of_reference_uid: Frame of reference of the labelled image.
        meta: Non-identifying metadata.
        labels: The declared labels, in increasing value order after validation.
    """

    labels: tuple[LabelInfo, ...] = ()

    def __post_init__(self) -> None:
        """Validate the geometry (as Volume), the dtype and the declared labels.

        Raises:
            InputRejected: A non-integer array, duplicate label values or names, or values in
                the array that no label declares (named in the message).
        """
        super().__post_init__()
        dtype = np.asarray(self.array).dtype
        if dtype == np.bool_ or not np.issubdtype(dtype, np.integer):
            raise InputRejected(
                f"a label map needs an integer array, got {dtype}; cast masks to uint8 and "
                "round probabilities explicitly before building a LabelMap"
            )
        labels = tuple(sorted(self.labels, key=lambda lab: lab.value))
        values = [lab.value for lab in labels]
        if len(set(values)) != len(values):
            dup = sorted({v for v in values if values.count(v) > 1})
            raise InputRejected(f"label values declared twice: {dup}")
        names = [lab.name for lab in labels]
        if len(set(names)) != len(names):
            dup_names = sorted({n for n in names if names.count(n) > 1})
            raise InputRejected(f"label names declared twice: {dup_names}")
        counts = _value_counts(self.array)
        present = {int(v) for v in np.flatnonzero(counts)} - {0}
        undeclared = sorted(present - set(values))
        if undeclared:
            raise InputRejected(
                f"label map holds values {undeclared[:20]}"
                f"{' ...' if len(undeclared) > 20 else ''} that no label declares "
                f"(declared: {values})"
            )
        object.__setattr__(self, "labels", labels)

    @classmethod
    def on_grid(
        cls, image: Volume, array: npt.NDArray[Any], labels: tuple[LabelInfo, ...]
    ) -> LabelMap:
        """Build a label map on the grid (affine, frame of reference) of ``image``.

        Args:
            image: The labelled image.
            array: Integer labels, shape equal to ``image.shape``.
            labels: Declared labels.

        Returns:
            The validated label map; ``meta`` keeps the image's series/SOP UIDs.

        Raises:
            InputRejected: Shape mismatch, or any of the :class:`LabelMap` checks.
        """
        if array.shape != image.shape:
            raise InputRejected(
                f"label array shape {array.shape} differs from the image grid {image.shape}"
            )
        return cls(
            array=array,
            affine=image.affine,
            modality="SEG",
            units="",
            frame_of_reference_uid=image.frame_of_reference_uid,
            meta=dict(image.meta),
            labels=labels,
        )

    @property
    def voxel_volume_mm3(self) -> float:
        """Volume of one voxel in mm³ (``|det|`` of the affine's 3x3 part)."""
        return float(abs(np.linalg.det(self.affine[:3, :3])))

    def label(self, value: int) -> LabelInfo:
        """The declared label with ``value`` (``KeyError`` when none)."""
        for lab in self.labels:
            if lab.value == value:
                return lab
        raise KeyError(value)

    def volumes_ml(self) -> dict[str, LabelVolume]:
        """Voxel count and volume (mL) of every declared label, keyed by label name.

        Declared labels absent from the array have count 0 and volume 0.0 mL. The voxel volume
        is ``|det(affine[:3, :3])|`` mm³, so sheared (tilted-gantry) grids are measured exactly.
        """
        counts = _value_counts(self.array)
        voxel_ml = self.voxel_volume_mm3 / 1000.0
        out: dict[str, LabelVolume] = {}
        for lab in self.labels:
            n = int(counts[lab.value]) if lab.value < counts.size else 0
            out[lab.name] = LabelVolume(value=lab.value, voxel_count=n, volume_ml=n * voxel_ml)
        return out

    def label_table(self) -> list[dict[str, Any]]:
        """The declared labels as JSON-compatible dicts, in value order."""
        return [lab.as_json() for lab in self.labels]
