"""One delivery attempt: claim the row, extract the job's DICOM outputs, send, record the outcome.

Errors become the row's state here, once: a :class:`~service.delivery.errors.DeliveryFailed`
or a peer error (:class:`~service.errors.PeerFailed`, :class:`~service.errors.PeerUnreachable`)
schedules a retry (until ``delivery_max_attempts``), an input error (no DICOM outputs, unknown
node, a file that cannot be transcoded) fails the row at once, and an unexpected exception is
logged and retried like a transient failure.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from models.errors import VoxelgateError
from service.delivery import attempts, rows
from service.delivery.attempts import DeliveryClaim
from service.delivery.dimse import store_files
from service.delivery.errors import DeliveryFailed
from service.delivery.sources import extract_dicom_outputs
from service.dicom.config import DicomConfig, Node, load_dicom_config
from service.dicom.dicomweb import describe, stow_instances
from service.errors import InputRejected, InvalidParameters, PeerFailed
from service.settings import Settings
from service.store.blobs import blob_store
from service.store.db import session_scope
from service.store.tables import Job

log = logging.getLogger(__name__)


class _Toucher:
    """Progress callback that refreshes the claim at most every ``TOUCH_INTERVAL_S``."""

    def __init__(self, settings: Settings, held: DeliveryClaim) -> None:
        self.settings, self.held, self.last = settings, held, time.monotonic()

    def __call__(self, done: int) -> None:
        del done
        if time.monotonic() - self.last >= attempts.TOUCH_INTERVAL_S:
            self.last = time.monotonic()
            if not attempts.touch(self.settings, self.held):
                raise DeliveryFailed("the attempt lost its claim on the delivery")


def _status_text(code: int) -> str:
    return f"0x{code:04X}" if code >= 0 else "no-context"


def _send(
    settings: Settings, config: DicomConfig, node: Node, files: list[Path], held: DeliveryClaim
) -> tuple[int, dict[str, Any]]:
    """Send ``files`` to ``node``; returns (instances delivered, detail) or raises."""
    if node.send_via == "dicomweb":
        outcome = stow_instances(node, files, timeout_s=settings.dimse_timeout_s)
        detail = describe(outcome)
        if not outcome.ok:
            raise DeliveryFailed(
                f"STOW-RS to {node.name}: {len(outcome.failed)} of {len(files)} instance(s) "
                f"refused ({', '.join(detail['reasons'])})",
                sent=len(outcome.stored),
            )
        return len(outcome.stored), detail
    report = store_files(
        node,
        files,
        settings,
        calling_ae=config.listener.ae_title,
        progress=_Toucher(settings, held),
    )
    detail = {
        "associations": report.associations,
        "transcoded": dict(report.transcoded),
        "failed": len(report.failed),
        "statuses": sorted({_status_text(code) for _, code in report.failed}),
    }
    if report.failed:
        raise DeliveryFailed(
            f"C-STORE to {node.name}: {len(report.failed)} of {len(files)} instance(s) refused "
            f"(statuses {', '.join(detail['statuses'])})",
            sent=report.sent,
        )
    return report.sent, detail


def _attempt(
    settings: Settings, config: DicomConfig, node: Node, held: DeliveryClaim
) -> tuple[int, dict[str, Any]]:
    """Extract the job's DICOM outputs and send them; returns (sent, detail) or raises."""
    with session_scope(settings.resolved_database_url) as session:
        job = session.get(Job, held.job_id)
        if job is None or job.state != "succeeded":
            raise DeliveryFailed("the job has no succeeded outputs any more", retry=False)
        outputs = dict(job.outputs)
    blobs = blob_store(settings)
    with blobs.staging_area() as staging:
        files = extract_dicom_outputs(settings, blobs, outputs, staging)
        return _send(settings, config, node, files, held)


def run_delivery(settings: Settings, delivery_id: str) -> str | None:
    """Claim and run one attempt of delivery ``delivery_id``.

    Returns:
        The row's state afterwards (``delivered``, ``pending``, ``failed``), or None when there
        was nothing to claim (a duplicate or early message, or a row already handled).
    """
    held = attempts.claim(settings, delivery_id)
    if held is None:
        return None
    log.info("delivery %s: attempt %d to %s", held.delivery_id, held.attempt, held.node)
    transport = ""
    try:
        config = load_dicom_config(settings)
        node = rows.check_destination(config, held.node)
        transport = node.send_via
        sent, detail = _attempt(settings, config, node, held)
    except DeliveryFailed as exc:
        return _failed(settings, held, transport, exc, retry=exc.retry, sent=exc.sent)
    except (InputRejected, InvalidParameters) as exc:  # no retry can fix the input
        return _failed(settings, held, transport, exc, retry=False)
    except PeerFailed as exc:  # PeerUnreachable too: the peer may answer later
        return _failed(settings, held, transport, exc, retry=True)
    except VoxelgateError as exc:
        return _failed(settings, held, transport, exc, retry=True)
    except Exception as exc:  # translate once: unexpected, logged, retried while attempts last
        log.exception("delivery %s: unexpected error", held.delivery_id)
        return _failed(settings, held, transport, exc, retry=True)
    if not attempts.succeed(settings, held, transport, sent, detail):
        log.warning("delivery %s: attempt lost its claim before finishing", held.delivery_id)
        return None
    log.info("delivery %s: %d instance(s) delivered to %s", held.delivery_id, sent, held.node)
    return "delivered"


def _failed(
    settings: Settings,
    held: DeliveryClaim,
    transport: str,
    exc: BaseException,
    *,
    retry: bool,
    sent: int = 0,
) -> str | None:
    message = str(exc) if isinstance(exc, VoxelgateError) else f"{type(exc).__name__}: {exc}"
    state = attempts.fail_attempt(settings, held, transport, message, retry=retry, sent=sent)
    log.warning(
        "delivery %s: attempt %d to %s failed (%s): %s",
        held.delivery_id,
        held.attempt,
        held.node,
        state,
        message[:300],
    )
    return state
