"""The ``voxelgate`` command line: list pipelines, run one on a file or folder.

``voxelgate run PIPELINE INPUT OUT`` runs on one input; a pipeline's other inputs are given by
name, ``--input reference=PATH`` (or ``--reference PATH``). ``--modality CT`` declares the
modality of inputs whose format records none (NIfTI not written by voxelgate, NRRD, MetaImage):
CT means the values are Hounsfield units; a file naming another modality is refused.

Errors are translated here once: a :class:`VoxelgateError` prints one line naming the problem
and exits with status 2; nothing half-written is left behind (outputs appear atomically).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from models.errors import InvalidParameters, VoxelgateError
from models.registry import all_specs, get_spec
from service.cli_dicom import add_dicom_commands
from service.cli_pacs import add_pacs_commands
from service.cli_service import add_service_commands
from service.cli_simulate import add_simulate_commands
from service.cli_train import add_dataset_commands, add_train_commands
from service.jobs.inputs import describe_inputs

log = logging.getLogger("voxelgate")


def parse_param(text: str) -> tuple[str, Any]:
    """Parse ``key=value``; the value is read as JSON when it parses, else kept as a string."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise InvalidParameters(f"parameter {text!r} is not key=value")
    try:
        value: Any = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.strip(), value


def parse_inputs(pairs: Sequence[str], reference: str | None = None) -> dict[str, Path]:
    """Parse repeated ``--input NAME=PATH`` (and the ``--reference PATH`` shorthand).

    Only the syntax is checked here; the names are checked against the pipeline's inputs by
    the runner before anything is read.

    Raises:
        InvalidParameters: Not ``NAME=PATH``, or a name given twice.
    """
    items = [*pairs, *([f"reference={reference}"] if reference is not None else [])]
    inputs: dict[str, Path] = {}
    for text in items:
        name, sep, path = text.partition("=")
        name = name.strip()
        if not sep or not name or not path:
            raise InvalidParameters(f"input {text!r} is not NAME=PATH")
        if name in inputs:
            raise InvalidParameters(f"input {name!r} is given twice")
        inputs[name] = Path(path)
    return inputs


def _cmd_pipelines(args: argparse.Namespace) -> int:
    if args.name:
        spec = get_spec(args.name)
        print(
            json.dumps(
                {
                    "name": spec.name,
                    "version": spec.version,
                    "queue": spec.queue,
                    "inputs": describe_inputs(spec),
                    "parameters": spec.params_model.model_json_schema(),
                },
                indent=2,
            )
        )
        return 0
    for spec in all_specs():
        print(f"{spec.name:20s} {spec.version:8s} [{spec.queue}] {spec.summary}")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from service.ingest.grouping import check_modality
    from workers.runner import LocalJob, run_local

    params = dict(parse_param(p) for p in args.param)
    extra_inputs = parse_inputs(args.inputs, args.reference)
    modality = check_modality(args.modality.upper()) if args.modality else None
    job = LocalJob(
        args.pipeline,
        Path(args.input),
        Path(args.output_dir),
        params,
        args.series_uid,
        args.allow_missing_study_uid,
        extra_inputs=extra_inputs,
        modality=modality,
        extra_modalities=dict.fromkeys(extra_inputs, modality) if modality else {},
    )
    with tqdm(total=100, unit="%", disable=args.quiet, file=sys.stderr) as bar:

        def progress(fraction: float, step: str) -> None:
            bar.n = round(100 * min(max(fraction, 0.0), 1.0))
            bar.set_description(step[:40])
            bar.refresh()

        record = run_local(job, progress)
    print(
        json.dumps(
            {
                "output_dir": str(job.output_dir),
                "files": sorted(record["files"]),
                "measurements": record["measurements"],
            },
            indent=2,
        )
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``voxelgate`` command."""
    parser = argparse.ArgumentParser(prog="voxelgate", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_list = sub.add_parser("pipelines", help="list registered pipelines (no torch import)")
    p_list.add_argument("name", nargs="?", help="show one pipeline's parameters")
    p_list.set_defaults(func=_cmd_pipelines)
    p_run = sub.add_parser("run", help="run a pipeline on a DICOM folder/zip or NIfTI file")
    p_run.add_argument("pipeline")
    p_run.add_argument(
        "input",
        help="DICOM folder, zip or file; .nii/.nii.gz; .nrrd; .mha; or a sinogram bundle "
        "(its voxelgate-sinogram/1 geometry JSON, or the folder holding it)",
    )
    p_run.add_argument("output_dir")
    p_run.add_argument("--param", "-p", action="append", default=[], metavar="KEY=VALUE")
    p_run.add_argument(
        "--input",
        "-i",
        dest="inputs",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="another input of the pipeline by name (e.g. reference=planning_ct/), same formats "
        "as INPUT, one series; repeatable ('voxelgate pipelines NAME' lists its inputs)",
    )
    p_run.add_argument("--reference", metavar="PATH", help="shorthand for --input reference=PATH")
    p_run.add_argument(
        "--modality",
        metavar="CT|MR|...",
        help="modality of INPUT and of every --input whose format records none (NIfTI not "
        "written by voxelgate, NRRD, MHA); CT states that the values are Hounsfield units. An "
        "input whose file names another modality is refused",
    )
    p_run.add_argument("--series-uid", help="series to use when the input holds several")
    p_run.add_argument(
        "--allow-missing-study-uid",
        action="store_true",
        help="accept DICOM whose StudyInstanceUID is empty (derived series "
        "then get a new StudyInstanceUID)",
    )
    p_run.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p_run.set_defaults(func=_cmd_run)
    add_service_commands(sub)
    add_dicom_commands(sub)
    add_pacs_commands(sub)
    add_train_commands(sub)
    add_dataset_commands(sub)
    add_simulate_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``voxelgate`` console script; returns the exit status."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        status: int = args.func(args)
    except VoxelgateError as exc:
        print(f"voxelgate: error ({exc.code}): {exc}", file=sys.stderr)
        return 2
    return status


if __name__ == "__main__":
    sys.exit(main())
