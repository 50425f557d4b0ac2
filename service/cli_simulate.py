"""``voxelgate simulate cbct``: a CBCT simulated from a real CT, for QA and training data.

Reads a CT (DICOM folder/zip/file, NIfTI, NRRD or MetaImage) with the project's readers, runs
:func:`models.physics.cbct.simulate_cbct` and writes, each atomically:

* ``OUTPUT.nii.gz``: the simulated CBCT in HU on the CT's grid (-1000 HU outside the field of
  view);
* ``OUTPUT.json``: the facts (every parameter, the seed, geometry, FOV fraction, timings);
* ``OUTPUT_fov.nii.gz``: the field-of-view mask (1 = reconstructable).

The simulator (and ITK/RTK) is imported inside the command, so importing this module stays light
and torch-free like the rest of ``service``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from models.errors import InputRejected
from models.volume import Volume

DEFAULT_TRUNCATION_FOV_MM = 250.0
"""Transaxial FOV (mm at the isocentre) of ``--truncate`` without ``--fov-mm``: about the
full-fan field of view of a linac on-board imager."""

_NIFTI_SUFFIXES = (".nii.gz", ".nii")


def output_paths(output: Path) -> tuple[Path, Path, Path]:
    """``(cbct, facts_json, fov_mask)`` paths for an ``OUTPUT.nii[.gz]`` argument."""
    name = output.name
    suffix = next((s for s in _NIFTI_SUFFIXES if name.lower().endswith(s)), None)
    if suffix is None:
        raise InputRejected(f"{output}: the output must be a .nii or .nii.gz file name")
    stem = name[: -len(suffix)]
    if not stem:
        raise InputRejected(f"{output}: the output file name has no stem")
    return output, output.with_name(f"{stem}.json"), output.with_name(f"{stem}_fov{suffix}")


def with_modality(volume: Volume, modality: str | None, path: Path) -> Volume:
    """Apply ``--modality`` to an input whose format does not record one.

    The rule of :func:`service.io.read_any.declare_modality` (shared with ``voxelgate run`` and
    the upload's ``nifti_modality``): a volume read as ``"OT"`` (NIfTI without voxelgate's
    header, NRRD, MetaImage) takes the given modality, and ``units="HU"`` when it is CT; a
    volume that already names another modality is refused rather than relabelled. Here, where
    the input must be a CT, an ``"OT"`` volume without ``--modality`` is refused with a hint.
    """
    from service.io.read_any import declare_modality  # the readers stay out of CLI start-up

    if modality is None and volume.modality == "OT":
        raise InputRejected(
            f"{path}: the file does not say what modality it is; pass --modality CT if it "
            "is a CT in Hounsfield units"
        )
    return declare_modality(volume, modality, str(path))


def _artefacts(args: argparse.Namespace) -> Any:
    """CBCTArtefacts from ``--random`` (drawn from the seed) overridden by explicit options."""
    from dataclasses import replace

    from models.physics.cbct import CBCTArtefacts, random_artefacts

    base = random_artefacts(args.seed) if args.random else CBCTArtefacts()
    changes: dict[str, Any] = {}
    for field, value in (
        ("spr", args.spr),
        ("scatter_sigma_mm", args.scatter_sigma_mm),
        ("i0", args.i0),
        ("cupping", args.cupping),
    ):
        if value is not None:
            changes[field] = value
    if args.no_noise:
        changes["i0"] = None
    if args.fov_mm is not None:
        changes["truncation_fov_mm"] = args.fov_mm
    elif args.truncate:
        changes["truncation_fov_mm"] = DEFAULT_TRUNCATION_FOV_MM
    if args.shift_mm is not None:
        changes["shift_mm"] = tuple(args.shift_mm)
    if args.rotate_deg is not None:
        changes["rotation_deg"] = tuple(args.rotate_deg)
    return replace(base, **changes)


def _geometry(args: argparse.Namespace) -> Any:
    from models.physics.cbct import CBCTGeometry

    return CBCTGeometry(
        sad_mm=args.sad_mm,
        sdd_mm=args.sdd_mm,
        n_projections=args.projections,
        detector_shape=tuple(args.detector) if args.detector else None,
        detector_pitch_mm=args.pitch_mm,
        detector_offset_mm=args.offset_mm,
        fdk_filter=args.filter,
        hann_cutoff=args.hann_cutoff,
        truncation_correction=args.truncation_correction,
    )


def cmd_simulate_cbct(args: argparse.Namespace) -> int:
    """Simulate, write the CBCT, its facts JSON and FOV mask; print the file names as JSON."""
    from models.physics.cbct import simulate_cbct
    from service.io.atomic import atomic_file
    from service.io.nifti import write_nifti
    from service.io.read_any import read_volume

    source = Path(args.input)
    cbct_path, facts_path, mask_path = output_paths(Path(args.output))
    geometry, artefacts = _geometry(args), _artefacts(args)
    clock = time.perf_counter()
    loaded = read_volume(source, args.series_uid, args.allow_missing_study_uid)
    ct = with_modality(loaded.volume, args.modality, source)
    result = simulate_cbct(ct, geometry, artefacts, seed=args.seed, threads=args.threads)
    facts = dict(result.facts)
    facts["random_artefacts"] = bool(args.random)
    facts["input"] = {
        "kind": loaded.kind,
        "shape_kji": list(ct.shape),
        "spacing_mm_kji": list(ct.spacing),
        "frame_of_reference_uid": ct.frame_of_reference_uid,
    }
    write_nifti(result.fov_mask, mask_path)
    with atomic_file(facts_path) as tmp:
        tmp.write_text(json.dumps(facts, indent=2, sort_keys=True), "utf-8")
    write_nifti(result.volume, cbct_path)
    summary = {
        "cbct": str(cbct_path),
        "facts": str(facts_path),
        "fov_mask": str(mask_path),
        "fov_fraction": facts["fov_fraction"],
        "seconds": round(time.perf_counter() - clock, 2),
    }
    print(json.dumps(summary, indent=2))
    return 0


def _add_cbct(ssub: Any) -> None:
    p = ssub.add_parser(
        "cbct",
        help="CBCT simulated from a CT: cone-beam projection, scatter, noise, cupping, FDK",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("input", help="CT: DICOM folder/zip/file, .nii/.nii.gz, .nrrd or .mha")
    p.add_argument("output", help="OUTPUT.nii.gz (also writes OUTPUT.json, OUTPUT_fov.nii.gz)")
    p.add_argument("--modality", help="modality of an input that does not record it (CT)")
    p.add_argument("--series-uid", help="series to use when the input holds several")
    p.add_argument("--allow-missing-study-uid", action="store_true")
    p.add_argument("--seed", type=int, default=0, help="noise seed (and --random draw)")
    p.add_argument("--random", action="store_true", help="draw the artefacts from the seed")
    g = p.add_argument_group("geometry (defaults: linac on-board imager, full fan)")
    g.add_argument("--projections", type=int, default=360, help="over 360 degrees")
    g.add_argument("--sad-mm", type=float, default=1000.0, help="source-isocentre (mm)")
    g.add_argument("--sdd-mm", type=float, default=1500.0, help="source-detector (mm)")
    g.add_argument("--detector", type=int, nargs=2, metavar=("NU", "NV"), help="default: auto")
    g.add_argument("--pitch-mm", type=float, help="detector pixel (mm); default: one voxel")
    g.add_argument("--offset-mm", type=float, default=0.0, help="lateral shift (half fan)")
    g.add_argument("--filter", default="hann", choices=["hann", "ramp"])
    g.add_argument("--hann-cutoff", type=float, default=1.0, help="fraction of Nyquist")
    g.add_argument(
        "--truncation-correction",
        type=float,
        help="FDK row extension for truncated projections, fraction of the detector width "
        "(default: 0.25 when the patient reaches the detector edge, else 0)",
    )
    a = p.add_argument_group("artefacts (default: none; with --random: drawn, then overridden)")
    a.add_argument("--spr", type=float, help="scatter-to-primary ratio")
    a.add_argument("--scatter-sigma-mm", type=float, help="scatter kernel width (mm)")
    a.add_argument("--i0", type=float, help="photons per detector pixel (Poisson noise)")
    a.add_argument("--no-noise", action="store_true", help="no Poisson noise (even --random)")
    a.add_argument("--cupping", type=float, help="beam-hardening coefficient b (p - b p^2)")
    a.add_argument(
        "--truncate",
        action="store_true",
        help=f"cut the detector to a {DEFAULT_TRUNCATION_FOV_MM:g} mm FOV (or --fov-mm)",
    )
    a.add_argument("--fov-mm", type=float, help="truncated transaxial FOV diameter (mm)")
    a.add_argument("--shift-mm", type=float, nargs=3, metavar=("X", "Y", "Z"), help="LPS mm")
    a.add_argument(
        "--rotate-deg", type=float, nargs=3, metavar=("RX", "RY", "RZ"), help="about LPS x y z"
    )
    p.add_argument("--threads", type=int, help="ITK threads (default: ITK's)")
    p.set_defaults(func=cmd_simulate_cbct)


def add_simulate_commands(sub: Any) -> None:
    """Register ``simulate cbct`` on the top-level subparsers."""
    p_sim = sub.add_parser("simulate", help="simulate acquisitions from real images")
    ssub = p_sim.add_subparsers(dest="simulation", required=True)
    _add_cbct(ssub)
