"""``/pipelines``: the registry (no torch import)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends

from models.registry import PipelineSpec, UnknownPipeline, all_specs, get_spec
from service.api.deps import Principal, get_principal
from service.errors import NotFound

router = APIRouter(prefix="/pipelines", tags=["pipelines"])


def spec_view(spec: PipelineSpec) -> dict[str, Any]:
    """JSON view of a registry record."""
    return {
        "name": spec.name,
        "version": spec.version,
        "summary": spec.summary,
        "queue": spec.queue,
        "inputs": [
            {
                "name": i.name,
                "modalities": list(i.modalities),
                "description": i.description,
                "required": i.required,
                "main": n == 0,
            }
            for n, i in enumerate(spec.inputs)
        ],
        "outputs": list(spec.outputs),
        "time_limit_s": spec.time_limit_s,
        "weights_sha256": spec.weights_sha256(),
        "parameters": spec.params_model.model_json_schema(),
    }


@router.get("", summary="List pipelines")
def list_pipelines(_: Principal = Depends(get_principal)) -> dict[str, Any]:
    """Every registered pipeline with its parameter schema."""
    return {"pipelines": [spec_view(s) for s in all_specs()]}


@router.get("/{name}", summary="Show a pipeline and its model card")
def show(name: str, _: Principal = Depends(get_principal)) -> dict[str, Any]:
    """One pipeline's record, parameter schema and model card (Markdown)."""
    try:
        spec = get_spec(name)
    except UnknownPipeline as exc:
        raise NotFound(str(exc)) from None
    return {**spec_view(spec), "model_card": spec.card_text()}
