"""Errors -> HTTP, in one place: JSON ``{"error": {"code", "message"}}`` with a 4xx/5xx status."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from models.errors import VoxelgateError

log = logging.getLogger(__name__)

STATUS_BY_CODE = {
    "not_found": 404,
    "conflict": 409,
    "payload_too_large": 413,
    "unsupported_media_type": 415,
    "unauthorized": 401,
    "input_rejected": 422,
    "invalid_parameters": 422,
    "unknown_pipeline": 422,
    "pipeline_failed": 500,
    "cancelled": 409,
    "worker_lost": 500,
    "peer_failed": 502,
    "peer_unreachable": 504,
}


def error_body(code: str, message: str) -> dict[str, dict[str, str]]:
    """The JSON body of every error response."""
    return {"error": {"code": code, "message": message}}


async def _voxelgate_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, VoxelgateError)
    status = STATUS_BY_CODE.get(exc.code, 400)
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(error_body(exc.code, str(exc)), status_code=status, headers=headers)


async def _validation_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    reasons = "; ".join(
        f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
    )
    return JSONResponse(error_body("invalid_request", reasons), status_code=422)


def install_error_handlers(app: FastAPI) -> None:
    """Register the translation of typed errors and request validation errors."""
    app.add_exception_handler(VoxelgateError, _voxelgate_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
