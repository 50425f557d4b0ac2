"""Typed errors shared by every layer.

Each transport translates them once: the CLI to an exit code and a one-line message, the HTTP API
to a 4xx/5xx JSON body, the DICOM listener to a failure status, the worker to a job state.
Messages name the offending file or parameter but never patient identifiers.
"""

from __future__ import annotations


class VoxelgateError(Exception):
    """Base class of every error voxelgate raises on purpose."""

    code = "error"


class InputRejected(VoxelgateError):
    """The input data is unusable (corrupt, inconsistent geometry, wrong type)."""

    code = "input_rejected"


class UnknownPipeline(VoxelgateError):
    """No pipeline is registered under the requested name."""

    code = "unknown_pipeline"


class InvalidParameters(VoxelgateError):
    """Pipeline parameters failed validation against the registry record."""

    code = "invalid_parameters"


class PipelineFailed(VoxelgateError):
    """A pipeline raised while computing on valid input."""

    code = "pipeline_failed"


class Cancelled(VoxelgateError):
    """The work was cancelled through the progress callback."""

    code = "cancelled"
