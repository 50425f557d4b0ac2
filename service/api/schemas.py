"""Request bodies of the API (responses are documented JSON views built by the store modules)."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

_EXAMPLE_SERIES = "3f2c9a8e5b6d4c1a9e7f0b2d4c6a8e1f"
_EXAMPLE_REFERENCE = "9a1b7c3d5e2f4a6b8c0d1e3f5a7b9c2d"

InputName = Annotated[str, StringConstraints(min_length=1, max_length=64)]
SeriesId = Annotated[str, StringConstraints(min_length=1, max_length=32)]
ExtraInputs = Annotated[
    dict[InputName, SeriesId],
    Field(
        default_factory=dict,
        max_length=8,
        description="the pipeline's other inputs by name -> stored series id, e.g. "
        '{"reference": "<series id>"} (GET /pipelines lists each input and whether it is '
        "optional); the main input is series_id / study_id",
    ),
]


class _OneTarget(BaseModel):
    """Exactly one of ``series_id`` and ``study_id`` (the main input), and any extra inputs."""

    series_id: str | None = Field(None, max_length=32, description="input series id")
    study_id: str | None = Field(None, max_length=32, description="input study id")
    inputs: ExtraInputs

    @model_validator(mode="after")
    def _one_target(self) -> _OneTarget:
        if (self.series_id is None) == (self.study_id is None):
            raise ValueError("give exactly one of series_id and study_id")
        return self


class JobRequest(_OneTarget):
    """Submit one job on a series, or on the one series of a study that fits the pipeline."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "series_id": _EXAMPLE_SERIES,
                    "pipeline": "zeroshot-denoise",
                    "params": {"max_iterations": 300},
                    "priority": 5,
                },
                {
                    "series_id": _EXAMPLE_SERIES,
                    "inputs": {"reference": _EXAMPLE_REFERENCE},
                    "pipeline": "cbct-to-sct",
                    "params": {},
                },
            ]
        },
    )

    pipeline: str = Field(..., max_length=64, description="registry name (GET /pipelines)")
    params: dict[str, Any] = Field(default_factory=dict, description="pipeline parameters")
    priority: int = Field(5, ge=0, le=9, description="0..9, 9 most urgent")


class CohortItem(_OneTarget):
    """One member of a cohort: a series or a study."""

    model_config = ConfigDict(extra="forbid")


class CohortRequest(BaseModel):
    """Run one pipeline with one parameter set over many series or studies."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "items": [
                        {"study_id": _EXAMPLE_SERIES},
                        {"series_id": _EXAMPLE_SERIES, "inputs": {"reference": _EXAMPLE_REFERENCE}},
                    ],
                    "pipeline": "zeroshot-denoise",
                    "params": {},
                    "priority": 3,
                }
            ]
        },
    )
    items: list[CohortItem] = Field(..., min_length=1, max_length=10_000)
    pipeline: str = Field(..., max_length=64)
    params: dict[str, Any] = Field(default_factory=dict)
    priority: int = Field(5, ge=0, le=9)
