"""A small real pipeline with an optional second input, registered only inside the tests.

The mechanism of extra inputs (CLI ``--input``, API ``inputs``, the store, the worker) is tested
with this record so that it does not depend on when a real pipeline with a reference input
lands in the registry. Its factory is :func:`run`: it needs the image in HU (like a CBCT
pipeline), writes ``shifted`` = image + offset, and when the optional ``reference`` is given on
the same grid, measures the mean absolute difference to it.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pytest
from pydantic import BaseModel, ConfigDict

from models import registry
from models.errors import InputRejected
from models.registry import InputSpec, PipelineSpec, provenance_for
from models.result import ProgressCallback, Result
from models.volume import Volume

NAME = "two-inputs-test"


class TwoInputParams(BaseModel):
    """Parameters of the test pipeline."""

    model_config = ConfigDict(extra="forbid")
    offset: float = 0.0


SPEC = PipelineSpec(
    name=NAME,
    version="0.0.1",
    summary="test pipeline: image + offset, compared with an optional reference",
    inputs=(
        InputSpec("image", ("CT",), "a CT in HU"),
        InputSpec("reference", ("CT",), "a CT on the same grid, for evaluation", required=False),
    ),
    outputs=("shifted",),
    queue="cpu",
    params_model=TwoInputParams,
    factory="tests.unit.two_input_pipeline:run",
    model_card="zeroshot_denoise.md",
    time_limit_s=600,
)


def run(inputs: Mapping[str, Volume], params: TwoInputParams, progress: ProgressCallback) -> Result:
    """``shifted`` = image + offset; ``mae_to_reference_hu`` when a reference is given."""
    image = inputs["image"]
    if image.units != "HU":
        raise InputRejected(f"{NAME} needs the image in HU; its units are {image.units!r}")
    progress(0.5, "shift")
    shifted = image.with_array((image.array + params.offset).astype(np.float32))
    measurements: dict[str, object] = {"inputs": sorted(inputs)}
    reference = inputs.get("reference")
    if reference is not None:
        if reference.shape != image.shape:
            raise InputRejected(f"reference grid {reference.shape} is not {image.shape}")
        diff = np.abs(shifted.array.astype(np.float64) - reference.array)
        measurements["mae_to_reference_hu"] = float(diff.mean())
    progress(1.0, "done")
    return Result(
        volumes={"shifted": shifted},
        measurements=measurements,
        figures=[],
        provenance=provenance_for(NAME, params, image),
    )


@pytest.fixture
def two_input_spec(monkeypatch: pytest.MonkeyPatch) -> PipelineSpec:
    """Register :data:`SPEC` for one test (lookup by name and the list of all records)."""
    monkeypatch.setitem(registry._BY_NAME, NAME, SPEC)
    monkeypatch.setattr(registry, "_SPECS", (*registry._SPECS, SPEC))
    return SPEC
