"""The one settings class. Nothing else in the code base reads the environment.

Every field can be set by an environment variable ``VOXELGATE_<FIELD>`` (upper case), e.g.
``VOXELGATE_DATABASE_URL=postgresql+psycopg://voxelgate@db/voxelgate``.

Defaults give the single-machine deployment that needs no server: SQLite for the job store,
kombu's SQLAlchemy transport on a second SQLite file as the Celery broker, blobs under
``data_dir``. Setting ``database_url`` and ``broker_url`` (``redis://...``) turns the same code
into the distributed deployment.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

GiB = 1024**3


class Settings(BaseSettings):
    """Configuration of the gateway, the workers and the CLI."""

    model_config = SettingsConfigDict(env_prefix="VOXELGATE_", extra="ignore")

    data_dir: Path = Field(
        Path("voxelgate-data"), description="blobs, staging area and the embedded databases"
    )
    database_url: str | None = Field(
        None, description="SQLAlchemy URL of the job store; default SQLite in data_dir"
    )
    broker_url: str | None = Field(
        None,
        description="Celery broker URL (redis://host:6379/0); default: kombu's SQLAlchemy "
        "transport on a SQLite file in data_dir (no server)",
    )
    host: str = Field("127.0.0.1", description="gateway bind address")
    port: int = Field(8000, ge=1, le=65535, description="gateway port")

    # ingest limits
    max_upload_bytes: int = Field(4 * GiB, ge=1, description="largest accepted request body")
    max_expanded_bytes: int = Field(
        16 * GiB, ge=1, description="largest total size of an archive's members once extracted"
    )
    max_archive_members: int = Field(200_000, ge=1, description="most members in one archive")
    max_compression_ratio: float = Field(
        200.0, gt=1.0, description="largest expanded/compressed ratio of one archive member"
    )

    # jobs and workers
    worker_concurrency: int = Field(1, ge=1, le=64, description="jobs run at once per worker")
    torch_threads: int = Field(0, ge=0, description="torch threads per job; 0 = cores/concurrency")
    progress_interval_s: float = Field(
        1.0, gt=0.0, description="least time between two progress writes of one job"
    )
    heartbeat_interval_s: float = Field(
        5.0, gt=0.0, description="period of a running job's liveness update"
    )
    heartbeat_timeout_s: float = Field(
        60.0, gt=0.0, description="a running job silent this long is taken as lost"
    )
    reaper_interval_s: float = Field(
        15.0, gt=0.0, description="period of the lost-job check run by workers and the gateway"
    )
    max_attempts: int = Field(
        2, ge=1, le=10, description="runs of one job at most (a lost worker costs one)"
    )
    time_limit_grace_s: int = Field(
        60, ge=1, description="hard time limit = the pipeline's soft limit + this"
    )

    # DICOM networking and delivery (nodes, listener and routing rules: see service.dicom.config)
    dicom_config: Path | None = Field(
        None,
        description="TOML file with the DICOM listener, the configured nodes and the routing "
        "rules; none: a listener with no known peers and no rules",
    )
    delivery_max_attempts: int = Field(
        5, ge=1, le=50, description="sends of one job's outputs to one node at most"
    )
    delivery_backoff_s: float = Field(
        10.0, gt=0.0, description="wait before the second send; doubles each time after"
    )
    delivery_backoff_max_s: float = Field(
        600.0, gt=0.0, description="longest wait between two sends of one delivery"
    )
    dimse_timeout_s: float = Field(
        60.0, gt=0.0, description="network, ACSE and DIMSE timeout of our DICOM associations"
    )

    @property
    def resolved_database_url(self) -> str:
        """SQLAlchemy URL of the job store."""
        return self.database_url or f"sqlite:///{(self.data_dir / 'voxelgate.db').resolve()}"

    @property
    def resolved_broker_url(self) -> str:
        """Celery broker URL."""
        return self.broker_url or f"sqla+sqlite:///{(self.data_dir / 'broker.db').resolve()}"

    @property
    def broker_is_redis(self) -> bool:
        """Whether the broker is Redis (messages may be lost on a restart without persistence)."""
        return self.resolved_broker_url.startswith(("redis://", "rediss://"))


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Return the process-wide settings (read from the environment once)."""
    return Settings()
