"""Query a configured node for studies (and their series) by C-FIND or QIDO-RS, one way for all.

The API route and the CLI both answer "what does this node hold?" with :func:`search_node`.
"""

from __future__ import annotations

from typing import Any

from service.dicom import dicomweb, scu
from service.dicom.config import Node
from service.dicom.query import StudyQuery
from service.settings import Settings


def search_node(
    settings: Settings, node: Node, query: StudyQuery, *, dicomweb_first: bool, with_series: bool
) -> tuple[str, list[dict[str, Any]]]:
    """Find the studies matching ``query`` on ``node``.

    Args:
        settings: Service settings (timeouts, our AE title).
        node: The node asked.
        query: Study-level match keys.
        dicomweb_first: Use QIDO-RS even when the node has a DIMSE service.
        with_series: Also list each study's series (one more query per study).

    Returns:
        ``("dimse" | "dicomweb", studies)``: each study as JSON (UIDs, date, modalities,
        description, counts), with ``"series"`` when asked.

    Raises:
        PeerUnreachable, PeerFailed: The node did not answer, or refused.
    """
    web = dicomweb_first or not node.has_dimse
    timeout = settings.dimse_timeout_s
    studies = (
        dicomweb.qido_studies(node, query, timeout_s=timeout)
        if web
        else scu.find_studies(node, query, settings)
    )
    out = []
    for study in studies:
        view = study.to_json()
        if with_series:
            series = (
                dicomweb.qido_series(node, study.study_uid, timeout_s=timeout)
                if web
                else scu.find_series(node, study.study_uid, settings)
            )
            view["series"] = [s.to_json() for s in series]
        out.append(view)
    return ("dicomweb" if web else "dimse"), out
