"""Studies leave the spool for the store once stable; then routing runs.

A study counts as complete when no instance of it arrived for ``listener.stable_age_s`` (and no
association of this process is still sending it). The :class:`StableFlusher` thread of
``voxelgate scp`` then claims its spool folder, ingests the files (``ingest_files(...,
source="dimse")``), audits ``receive`` and routes the series that got new instances, unless the
last association that sent the study was interrupted: then the instances received whole are
stored, but no rule fires (the audit event says ``interrupted``), since the study is likely
incomplete. :func:`flush_study` does the same at once for one study (C-MOVE retrieves call it
after the move finished).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from models.errors import InputRejected, VoxelgateError
from service.dicom.config import DicomConfig, load_dicom_config
from service.dicom.routing import Arrival, Routed, route_series
from service.dicom.spool import Claimed, Sidecar, Spool, spool_for
from service.settings import Settings
from service.store import audit
from service.store.blobs import blob_store
from service.store.db import session_scope
from service.store.studies import IngestReport, ingest_files

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FlushResult:
    """Outcome of ingesting one spooled study.

    Attributes:
        report: What the store did with the files.
        routed: Jobs queued by routing rules (empty when not routed).
        interrupted: Whether the last association sending the study did not end by a release.
    """

    report: IngestReport
    routed: list[Routed]
    interrupted: bool


def ingest_claimed(
    settings: Settings,
    config: DicomConfig | None,
    spool: Spool,
    claimed: Claimed,
    *,
    route: bool,
) -> FlushResult | None:
    """Ingest a claimed spool folder, audit it, route it (when asked and not interrupted).

    Args:
        settings: Service settings.
        config: DICOM configuration holding the rules (``None``: read from settings if needed).
        spool: The spool the folder belongs to.
        claimed: The folder, claimed by this process.
        route: Whether routing rules may fire for the new series.

    Returns:
        The :class:`FlushResult`; ``None`` when the folder held no instance.

    Raises:
        InputRejected: The store refused the files (the folder is kept under ``.failed``).
        Conflict: A concurrent ingest of the same study; the folder went back to the spool (so
            does it on any other error).
    """
    files = claimed.files()
    sidecar = claimed.sidecar() or Sidecar(study_uid="")
    if not files:
        spool.finish(claimed)
        return None
    try:
        with session_scope(settings.resolved_database_url) as session:
            report = ingest_files(
                session, blob_store(settings), claimed.tenant_id, files, settings, source="dimse"
            )
            for study_id in report.study_ids:
                audit.record(
                    session,
                    tenant_id=claimed.tenant_id,
                    key_id="",
                    action="receive",
                    resource="study",
                    resource_id=study_id,
                    detail={
                        "source": "dimse",
                        "calling_ae": sidecar.calling_ae,
                        "called_ae": sidecar.called_ae,
                        "instances": report.instances_stored,
                        "duplicates": report.instances_duplicate,
                        "bytes": report.bytes_stored,
                        "series": len(report.series_ids),
                        "interrupted": sidecar.interrupted,
                    },
                )
    except InputRejected as exc:
        kept = spool.quarantine(claimed)
        log.warning("spool: study folder refused by the store, kept in %s: %s", kept, exc)
        raise
    except BaseException:  # a concurrent ingest (Conflict), a locked or lost database ...
        spool.unclaim(claimed)  # back to the spool: tried again after the stable age
        raise
    spool.finish(claimed)
    routed: list[Routed] = []
    new_series = [sid for sid, n in report.series_stored.items() if n > 0]
    if route and not sidecar.interrupted and new_series:
        arrival = Arrival("dimse", sidecar.calling_ae, sidecar.called_ae)
        rules = config if config is not None else load_dicom_config(settings)
        routed = route_series(settings, rules, claimed.tenant_id, new_series, arrival)
    elif route and sidecar.interrupted:
        log.info("spool: study %s stored but not routed (transfer interrupted)", report.study_ids)
    log.info(
        "spool: ingested %d instances (%d duplicates) from %s; %d jobs routed",
        report.instances_stored,
        report.instances_duplicate,
        sidecar.calling_ae or "?",
        len(routed),
    )
    return FlushResult(report, routed, sidecar.interrupted)


def flush_study(
    settings: Settings, tenant_id: str, study_uid: str, *, route: bool
) -> FlushResult | None:
    """Ingest now whatever the listener spooled for one study.

    Args:
        settings: Service settings (the same ``data_dir`` as the listener's).
        tenant_id: Owner (the listener's tenant).
        study_uid: StudyInstanceUID as sent (or as derived when the instances carry none).
        route: Whether routing rules may fire (C-MOVE retrieves pass ``False``).

    Returns:
        The :class:`FlushResult`; ``None`` if nothing of that study was spooled (e.g. the
        listener's own flusher already stored it).

    Raises:
        InputRejected: The store refused the files (kept under the spool's ``.failed``).
        Conflict: A concurrent ingest of the same study (the files went back to the spool).
    """
    spool = spool_for(settings)
    claimed = spool.claim_study(tenant_id, study_uid)
    if claimed is None:
        return None
    return ingest_claimed(settings, None, spool, claimed, route=route)


class StableFlusher(threading.Thread):
    """Background thread of ``voxelgate scp``: ingests studies once they are stable."""

    def __init__(
        self,
        settings: Settings,
        config: DicomConfig,
        busy: Callable[[], set[str]],
        period_s: float | None = None,
    ) -> None:
        """Create the thread (not started).

        Args:
            settings: Service settings.
            config: DICOM configuration (listener stable age, routing rules).
            busy: Spool keys of studies that an open association is still sending.
            period_s: Seconds between two scans (default: a quarter of the stable age, 0.2-5).
        """
        super().__init__(name="voxelgate-stable-flush", daemon=True)
        self.settings = settings
        self.config = config
        self.spool = spool_for(settings)
        self.busy = busy
        age = config.listener.stable_age_s
        self.period_s = period_s if period_s is not None else min(max(age / 4, 0.2), 5.0)
        self.stop_event = threading.Event()

    def stop(self, timeout_s: float = 30.0) -> None:
        """Ask the thread to stop and wait for the study it is ingesting, if any."""
        self.stop_event.set()
        if self.is_alive():
            self.join(timeout_s)

    def run(self) -> None:
        """Scan the spool until stopped; an error with one study never stops the thread."""
        while not self.stop_event.is_set():
            try:
                self.run_once(time.time())
            except Exception as exc:  # keep flushing other studies; the folder stays spooled
                log.error("stable flush pass failed: %s", type(exc).__name__)
            self.stop_event.wait(self.period_s)

    def run_once(self, now: float) -> int:
        """One pass: ingest every stable study and every orphaned claim; returns studies done."""
        done = 0
        age = self.config.listener.stable_age_s
        for tenant_id in self.spool.tenants():
            for claimed in list(self.spool.orphaned_claims(tenant_id)):
                done += self._ingest(claimed)
            busy = self.busy()
            for study in list(self.spool.studies(tenant_id)):
                if self.stop_event.is_set():
                    return done
                if study.key in busy or now - study.last_arrival < age:
                    continue
                retrieve_until = self.spool.expected_until(tenant_id, study.key)
                if retrieve_until is not None and now < retrieve_until:
                    continue  # our own C-MOVE is bringing it; the retrieve ingests it
                taken = self.spool.claim(tenant_id, study.key)
                if taken is not None:
                    done += self._ingest(taken, route=retrieve_until is None)
                    self.spool.unexpect(tenant_id, study.key)
        return done

    def _ingest(self, claimed: Claimed, route: bool = True) -> int:
        try:
            result = ingest_claimed(self.settings, self.config, self.spool, claimed, route=route)
        except VoxelgateError as exc:
            log.warning("stable flush: study not ingested (%s)", exc.code)
            return 0
        except Exception as exc:  # e.g. the database is unreachable: the folder is spooled again
            log.error("stable flush: study not ingested (%s)", type(exc).__name__)
            return 0
        return int(result is not None)
