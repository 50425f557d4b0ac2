"""Transcoding for C-STORE: which transfer syntax to send an instance in, and the conversion.

A peer accepts, per SOP class, some of the transfer syntaxes we propose (see
:func:`proposed_syntaxes`). :func:`plan` chooses one for an instance stored in ``stored``:

* the stored syntax itself when accepted (nothing to do);
* else an uncompressed little-endian syntax (Explicit, then Implicit VR): from an uncompressed
  file that only changes the encoding; from a compressed one the pixel data is decompressed;
* else RLE Lossless (compressed losslessly by pydicom, after decompressing if needed).

Lossy-compressed pixel data that is decompressed stays marked lossy (``LossyImageCompression``
is kept as stored). Big-endian targets are never chosen (retired, and OW pixel data would need
byte swapping), and a big-endian instance is sent only as it is.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Literal

from pydicom.dataset import Dataset
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
)

from models.errors import InputRejected

Action = Literal["none", "reencode", "decompress", "compress"]
UNCOMPRESSED_TARGETS: tuple[UID, ...] = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
FALLBACK_SYNTAXES: tuple[UID, ...] = (*UNCOMPRESSED_TARGETS, RLELossless)


@dataclass(frozen=True)
class Plan:
    """How to send one instance.

    Attributes:
        target: The transfer syntax it goes out in (accepted by the peer).
        action: ``none`` (as stored), ``reencode`` (uncompressed to another uncompressed
            syntax), ``decompress`` (compressed to uncompressed), ``compress`` (to RLE Lossless,
            decompressing first when stored compressed).
    """

    target: UID
    action: Action


def proposed_syntaxes(stored: Collection[str]) -> list[UID]:
    """The transfer syntaxes to propose for one SOP class whose instances are stored in ``stored``.

    Each stored syntax first (in the order given, without repeats), then the fallbacks we can
    transcode to: Explicit VR LE, Implicit VR LE, RLE Lossless.
    """
    ordered: list[UID] = []
    for uid in [*(UID(s) for s in stored), *FALLBACK_SYNTAXES]:
        if uid not in ordered:
            ordered.append(uid)
    return ordered


def plan(stored: str, accepted: Collection[str]) -> Plan:
    """Choose the transfer syntax and conversion for an instance stored in ``stored``.

    Args:
        stored: The instance's transfer syntax UID.
        accepted: Transfer syntaxes the peer accepted for its SOP class.

    Returns:
        The :class:`Plan`.

    Raises:
        InputRejected: No accepted syntax can be reached (e.g. the peer accepts only JPEG
            baseline, and we do not encode lossy).
    """
    source = UID(stored)
    offered = {UID(a) for a in accepted}
    if source in offered:
        return Plan(source, "none")
    if not source.is_little_endian:  # retired; its OW pixel bytes would need swapping
        raise InputRejected(f"the peer does not accept {source.name} and we do not convert it")
    for target in UNCOMPRESSED_TARGETS:
        if target in offered:
            return Plan(target, "decompress" if source.is_compressed else "reencode")
    if RLELossless in offered:
        return Plan(RLELossless, "compress")
    names = ", ".join(sorted(UID(a).name for a in offered)) or "none"
    raise InputRejected(
        f"the peer accepts none of the transfer syntaxes we can send {source.name} data in "
        f"(it accepted: {names})"
    )


def apply(ds: Dataset, chosen: Plan) -> Dataset:
    """Convert ``ds`` (read from a file, with file meta) in place as ``chosen`` says.

    Returns:
        ``ds``, whose ``file_meta.TransferSyntaxUID`` and encoding now match ``chosen.target``.

    Raises:
        InputRejected: The pixel data cannot be decoded or encoded (no codec installed, corrupt).
    """
    if chosen.action == "none":
        return ds
    try:
        # The SOP Instance UID stays: the conversion loses nothing (a lossy original stays
        # marked lossy), and a resend must reach the peer as the same instance.
        if chosen.action in ("decompress", "compress") and _compressed(ds):
            ds.decompress(generate_instance_uid=False)
        if chosen.action == "compress":
            ds.compress(RLELossless, generate_instance_uid=False)
    except (RuntimeError, ValueError, NotImplementedError) as exc:
        raise InputRejected(f"cannot transcode to {chosen.target.name}: {exc}") from exc
    for _ in ds.iterall():  # parse every raw element: its bytes are in the old encoding
        pass
    ds.file_meta.TransferSyntaxUID = chosen.target
    ds.set_original_encoding(
        chosen.target.is_implicit_VR, chosen.target.is_little_endian, ds.original_character_set
    )
    return ds


def _compressed(ds: Dataset) -> bool:
    return bool(UID(ds.file_meta.TransferSyntaxUID).is_compressed)
