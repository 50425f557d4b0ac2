"""``voxelgate pacs``: the configured DICOM nodes from the command line.

``pacs nodes`` lists them; ``pacs echo NODE`` checks one; ``pacs find NODE`` queries studies
(C-FIND, or QIDO-RS with ``--dicomweb``); ``pacs retrieve NODE STUDY_UID --tenant T`` pulls a
study into the store; ``pacs cohort NODE --tenant T --pipeline P`` creates a PACS-query cohort
(its fetch runs on an io worker). Output is JSON; errors exit 2 with one line (see
:mod:`service.cli`). Nothing printed carries patient names or IDs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from service.errors import InvalidParameters
from service.settings import Settings, get_settings


def _settings(args: argparse.Namespace) -> Settings:
    settings = get_settings()
    if getattr(args, "config", None):
        settings = settings.model_copy(update={"dicom_config": Path(args.config)})
    return settings


def _query(args: argparse.Namespace) -> Any:
    from service.dicom.query import StudyQuery

    keys = {}
    for item in args.key:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise InvalidParameters(f"--key {item!r} is not KEYWORD=VALUE")
        keys[name.strip()] = value
    try:
        return StudyQuery(
            modality=args.modality,
            study_date=args.date,
            study_uid=args.study_uid,
            keys=keys,
            limit=args.limit,
        )
    except ValueError as exc:  # pydantic ValidationError
        raise InvalidParameters(f"invalid query: {exc}") from exc


def _tenant_id(settings: Settings, name: str) -> str:
    from service.store.auth import find_tenant
    from service.store.db import session_scope, upgrade_schema

    upgrade_schema(settings.resolved_database_url)
    with session_scope(settings.resolved_database_url) as session:
        tenant = find_tenant(session, name)
        if tenant is None:
            raise InvalidParameters(f"no tenant {name!r} (create it with 'voxelgate keys create')")
        return tenant.id


def _print(data: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=True))


def cmd_nodes(args: argparse.Namespace) -> int:
    """List the configured nodes."""
    from service.dicom.config import load_dicom_config

    config = load_dicom_config(_settings(args))
    _print(
        [
            {
                "name": n.name,
                "ae_title": n.ae_title,
                "host": n.host,
                "port": n.port,
                "dicomweb_url": n.dicomweb_url,
                "send_via": n.send_via,
                "retrieve_via": n.retrieve_via,
            }
            for n in sorted(config.nodes.values(), key=lambda n: n.name)
        ]
    )
    return 0


def cmd_echo(args: argparse.Namespace) -> int:
    """C-ECHO one node."""
    from service.dicom.config import load_dicom_config
    from service.dicom.scu import echo

    settings = _settings(args)
    status = echo(load_dicom_config(settings).node(args.node), settings)
    _print({"node": args.node, "status": f"0x{status:04X}"})
    return 0


def cmd_find(args: argparse.Namespace) -> int:
    """Query one node for studies (and their series with ``--series``)."""
    from service.dicom.config import load_dicom_config
    from service.dicom.search import search_node

    settings = _settings(args)
    node = load_dicom_config(settings).node(args.node)
    _, studies = search_node(
        settings, node, _query(args), dicomweb_first=args.dicomweb, with_series=args.series
    )
    _print(studies)
    return 0


def cmd_retrieve(args: argparse.Namespace) -> int:
    """Pull one study into a tenant's store."""
    from service.dicom.retrieve import retrieve_study

    settings = _settings(args)
    report = retrieve_study(
        settings, _tenant_id(settings, args.tenant), args.node, args.study_uid, args.via
    )
    _print(
        {
            "study_ids": report.study_ids,
            "instances_stored": report.instances_stored,
            "instances_duplicate": report.instances_duplicate,
            "bytes_stored": report.bytes_stored,
        }
    )
    return 0


def cmd_cohort(args: argparse.Namespace) -> int:
    """Create a PACS-query cohort; prints its id."""
    from service.cli import parse_param
    from service.dicom.pacs_cohort import create_pacs_cohort

    settings = _settings(args)
    cohort_id = create_pacs_cohort(
        settings,
        _tenant_id(settings, args.tenant),
        args.node,
        _query(args),
        args.pipeline,
        dict(parse_param(p) for p in args.param),
        priority=args.priority,
        destinations=args.destination,
        via=args.via,
    )
    _print({"cohort_id": cohort_id})
    return 0


def _query_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--modality", help="modality in the study, e.g. CT")
    parser.add_argument("--date", help="study date YYYYMMDD or range YYYYMMDD-YYYYMMDD")
    parser.add_argument("--study-uid", help="one StudyInstanceUID")
    parser.add_argument(
        "--key", action="append", default=[], metavar="KEYWORD=VALUE", help="further match keys"
    )
    parser.add_argument("--limit", type=int, default=1000, help="most studies (default 1000)")


def add_pacs_commands(sub: Any) -> None:
    """Register ``pacs`` and its subcommands on the CLI's subparsers."""
    p_pacs = sub.add_parser("pacs", help="configured DICOM nodes: echo, find, retrieve, cohorts")
    p_pacs.add_argument("--config", help="DICOM TOML file (default: VOXELGATE_DICOM_CONFIG)")
    pacs = p_pacs.add_subparsers(dest="pacs_command", required=True)
    pacs.add_parser("nodes", help="list the configured nodes").set_defaults(func=cmd_nodes)
    p_echo = pacs.add_parser("echo", help="C-ECHO a node")
    p_echo.add_argument("node")
    p_echo.set_defaults(func=cmd_echo)
    p_find = pacs.add_parser("find", help="query a node for studies")
    p_find.add_argument("node")
    _query_options(p_find)
    p_find.add_argument("--series", action="store_true", help="list each study's series too")
    p_find.add_argument("--dicomweb", action="store_true", help="QIDO-RS instead of C-FIND")
    p_find.set_defaults(func=cmd_find)
    vias = ("move", "get", "dicomweb")
    p_ret = pacs.add_parser("retrieve", help="pull a study into the store")
    p_ret.add_argument("node")
    p_ret.add_argument("study_uid")
    p_ret.add_argument("--tenant", required=True, help="tenant name that gets the study")
    p_ret.add_argument("--via", choices=vias, help="default: the node's retrieve_via")
    p_ret.set_defaults(func=cmd_retrieve)
    p_coh = pacs.add_parser("cohort", help="cohort from a query: retrieve and process studies")
    p_coh.add_argument("node")
    _query_options(p_coh)
    p_coh.add_argument("--tenant", required=True, help="tenant name that owns the cohort")
    p_coh.add_argument("--pipeline", required=True)
    p_coh.add_argument("--param", "-p", action="append", default=[], metavar="KEY=VALUE")
    p_coh.add_argument("--priority", type=int, default=5, help="0..9, 9 most urgent")
    p_coh.add_argument(
        "--destination", action="append", default=[], help="node that receives the outputs"
    )
    p_coh.add_argument("--via", choices=vias, help="default: the node's retrieve_via")
    p_coh.set_defaults(func=cmd_cohort)
