"""The FastAPI app factory: ``create_app(settings)``, or from the environment for uvicorn."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from service import __version__
from service.api.errors import install_error_handlers
from service.api.routes import cohorts, dicomweb, jobs, pacs, pipelines, studies, system
from service.jobs.reaper import Reaper
from service.settings import Settings, get_settings
from service.store.blobs import blob_store
from service.store.db import upgrade_schema

log = logging.getLogger(__name__)

DESCRIPTION = """voxelgate: upload CT/CBCT/MR studies, run reconstruction, denoising and
segmentation pipelines on CPU/GPU workers, download volumes, DICOM objects and reports.

Every route except `/health` needs an API key: `Authorization: Bearer vg_...` or `X-API-Key`.
Errors are JSON: `{"error": {"code": "...", "message": "..."}}`. Not a medical device."""


def create_app(settings: Settings | None = None, *, run_reaper: bool = True) -> FastAPI:
    """Build the gateway for ``settings`` (default: from the environment).

    The schema is upgraded at start-up and, unless ``run_reaper`` is false, the gateway runs
    the lost-job reaper in a background thread.
    """
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        upgrade_schema(settings.resolved_database_url)
        reaper = Reaper(settings) if run_reaper else None
        if reaper is not None:
            reaper.start()
        try:
            yield
        finally:
            if reaper is not None:
                reaper.stop()

    app = FastAPI(
        title="voxelgate", version=__version__, description=DESCRIPTION, lifespan=lifespan
    )
    app.state.settings = settings
    app.state.blobs = blob_store(settings)
    install_error_handlers(app)
    for module in (system, studies, jobs, cohorts, pipelines, pacs, dicomweb):
        app.include_router(module.router)
    return app


def app_from_environment() -> FastAPI:
    """Factory for ``uvicorn --factory service.api.app:app_from_environment``."""
    return create_app()
