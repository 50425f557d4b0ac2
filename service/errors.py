"""Errors of the service edges, beside the compute errors of :mod:`models.errors`.

Each transport translates every :class:`~models.errors.VoxelgateError` once: the HTTP API in
``service/api/errors.py``, the worker into a job state in ``workers/runner.py``, the CLI into an
exit code. Messages never carry patient identifiers.
"""

from __future__ import annotations

from models.errors import (
    Cancelled,
    InputRejected,
    InvalidParameters,
    PipelineFailed,
    UnknownPipeline,
    VoxelgateError,
)

__all__ = [
    "Cancelled",
    "Conflict",
    "InputRejected",
    "InvalidParameters",
    "NotFound",
    "PayloadTooLarge",
    "PeerFailed",
    "PeerUnreachable",
    "PipelineFailed",
    "Unauthorized",
    "UnknownPipeline",
    "VoxelgateError",
    "WorkerLost",
]


class NotFound(VoxelgateError):
    """No such resource for this tenant (another tenant's resources are 'not found' too)."""

    code = "not_found"


class Conflict(VoxelgateError):
    """The request contradicts the resource's current state (e.g. cancel a finished job)."""

    code = "conflict"


class PayloadTooLarge(VoxelgateError):
    """An upload or archive exceeds a configured size limit."""

    code = "payload_too_large"


class Unauthorized(VoxelgateError):
    """Missing, unknown or revoked API key."""

    code = "unauthorized"


class WorkerLost(VoxelgateError):
    """The worker running a job stopped without finishing it."""

    code = "worker_lost"


class PeerFailed(VoxelgateError):
    """A DICOM peer (PACS, DICOMweb server) refused or failed a request it received."""

    code = "peer_failed"


class PeerUnreachable(PeerFailed):
    """A DICOM peer did not answer: connection refused, association rejected/aborted, timeout.

    Transient by nature: deliveries and fetches retry it.
    """

    code = "peer_unreachable"
