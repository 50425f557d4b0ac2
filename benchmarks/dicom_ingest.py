"""C-STORE ingest: our listener (``voxelgate scp``) versus Orthanc, same machine, same run.

The study: 275 axial 512² CT slices simulated from the real TotalSegmentator example CT
(../shared/data/totalsegmentator/example_ct_dicom, 20 slices, JPEG 2000 lossless): the slices
are decoded, sorted along the slice normal and linearly interpolated to 275 positions over the
same extent (ImagePositionPatient/SliceLocation follow; the source's empty SOP Class/Instance
UIDs are filled in, or storescu cannot send the files), plus Gaussian noise (sigma 2 HU,
``numpy.random.default_rng(seed)``); written uncompressed (Explicit VR Little Endian, int16, the
source's header otherwise), with UIDs generated from the seed (deterministic) and a synthetic
patient. Both peers receive the same files from dcmtk ``storescu`` in one association (the same
command line, with dcmtk's ``TCP_NODELAY=1``; each peer announces its own maximum PDU).

Peers, each run ``--repeats`` times in rotating order, a fresh peer (empty storage) each time:

* ``voxelgate``: ``voxelgate scp`` as configured by default: each instance validated and written
  atomically into the spool before the answer (not fsynced, like Orthanc's own files);
* ``voxelgate, fsync``: the same with ``listener.fsync_instances = true`` (file and folder entry
  flushed to disk before each answer);
* ``Orthanc, as shipped``: Debian's Orthanc 1.10 with the test launcher's configuration;
* ``Orthanc, tuned``: the same with ``TCP_NODELAY=1`` in its environment (its DICOM stack is
  dcmtk, which otherwise leaves Nagle's algorithm on: about 50 ms per instance here) and
  ``MaximumPduLength`` 128 KiB (the largest PDU storescu sends).

Measured: wall time of ``storescu`` until the last C-STORE response (instances/s, MB/s of the
files sent). Orthanc has indexed an instance when it answers; our listener has spooled it, so the
ingest that follows (``flush_study``: index rows, files moved into the store) is timed too.

    python benchmarks/dicom_ingest.py [--slices 275] [--repeats 3] [--seed 0] [--keep DIR]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.integration.pacs.listener import LISTENER_AE, ScpProcess, dcmtk  # noqa: E402
from tests.integration.pacs.orthanc import OrthancPeer, orthanc_available  # noqa: E402

SOURCE = REPO.parent / "shared" / "data" / "totalsegmentator" / "example_ct_dicom"
SENDER = "BENCHSCU"
TUNED = {"MaximumPduLength": 131072}  # the largest PDU storescu sends (Debian default: 16 KiB)


def simulate_study(out: Path, n_slices: int, seed: int) -> list[Path]:
    """Write the simulated study (see the module docstring); returns the files in order."""
    sources = [pydicom.dcmread(p) for p in sorted(SOURCE.iterdir())]
    sources.sort(key=lambda ds: float(ds.ImagePositionPatient[2]))
    z = np.array([float(ds.ImagePositionPatient[2]) for ds in sources])
    stack = np.stack([ds.pixel_array.astype(np.float32) for ds in sources])
    rng = np.random.default_rng(seed)
    new_z = np.linspace(z[0], z[-1], n_slices)
    study_uid = generate_uid(entropy_srcs=[f"bench-study-{seed}"])
    series_uid = generate_uid(entropy_srcs=[f"bench-series-{seed}"])
    frame_uid = generate_uid(entropy_srcs=[f"bench-frame-{seed}"])
    template = copy.deepcopy(sources[0])
    template.decompress()  # uncompressed file meta and pixel attributes
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, zi in enumerate(new_z):
        k = int(np.clip(np.searchsorted(z, zi) - 1, 0, len(z) - 2))
        w = (zi - z[k]) / (z[k + 1] - z[k])
        image = (1 - w) * stack[k] + w * stack[k + 1] + rng.normal(0.0, 2.0, stack[k].shape)
        ds = copy.deepcopy(template)
        info = np.iinfo(np.int16)
        ds.PixelData = np.clip(np.round(image), info.min, info.max).astype(np.int16).tobytes()
        ds.PixelRepresentation = 1
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
        sop_uid = generate_uid(entropy_srcs=[f"bench-instance-{seed}-{i}"])
        ds.SOPInstanceUID = sop_uid
        ds.SOPClassUID = template.file_meta.MediaStorageSOPClassUID  # empty in the source
        ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.PatientID, ds.PatientName = "BENCH0001", "Bench^Synthetic"
        ds.InstanceNumber = i + 1
        ds.ImagePositionPatient = [*template.ImagePositionPatient[:2], float(zi)]
        ds.SliceLocation = float(zi)
        path = out / f"slice{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def send(port: int, called_ae: str, folder: Path) -> float:
    """Wall seconds of one ``storescu`` association sending every file of ``folder``."""
    cmd = [dcmtk("storescu"), "-aet", SENDER, "-aec", called_ae, "+sd"]
    env = {**os.environ, "TCP_NODELAY": "1"}  # dcmtk's switch: no Nagle delay on the sender
    start = time.perf_counter()
    done = subprocess.run(
        [*cmd, "127.0.0.1", str(port), str(folder)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        env=env,
    )
    elapsed = time.perf_counter() - start
    if done.returncode != 0 or "Failed" in done.stderr or "Error" in done.stderr:
        raise RuntimeError(f"storescu failed ({done.returncode}): {done.stderr[-2000:]}")
    return elapsed


def run_ours(folder: Path, work: Path, n: int, *, fsync: bool) -> dict[str, float]:
    from service.dicom.stable import flush_study
    from service.settings import Settings
    from service.store.auth import ensure_tenant
    from service.store.db import session_scope

    settings = Settings(data_dir=work / "vg-data")
    nodes = {"bench": {"ae_title": SENDER, "host": "127.0.0.1", "port": 104}}
    scp = ScpProcess.start(settings, work, nodes=nodes, stable_age_s=3600.0, fsync_instances=fsync)
    try:
        seconds = send(scp.port, LISTENER_AE, folder)
    finally:
        scp.stop()
    with session_scope(settings.resolved_database_url) as session:
        tenant_id = ensure_tenant(session, "default").id
    study_uid = pydicom.dcmread(next(folder.iterdir()), stop_before_pixels=True).StudyInstanceUID
    start = time.perf_counter()
    result = flush_study(settings, tenant_id, study_uid, route=False)
    ingest = time.perf_counter() - start
    stored = result.report.instances_stored if result else 0
    if stored != n:
        raise RuntimeError(f"our listener stored {stored} of {n} instances")
    return {"cstore_s": seconds, "ingest_s": ingest}


def run_orthanc(folder: Path, work: Path, n: int, *, tuned: bool) -> dict[str, float]:
    saved = os.environ.get("TCP_NODELAY")
    if tuned:  # Orthanc's DICOM stack is dcmtk: TCP_NODELAY=1 switches Nagle off
        os.environ["TCP_NODELAY"] = "1"
    else:
        os.environ.pop("TCP_NODELAY", None)
    try:
        peer = OrthancPeer.start(work, config=TUNED if tuned else None)
    finally:
        os.environ.pop("TCP_NODELAY", None)
        if saved is not None:
            os.environ["TCP_NODELAY"] = saved
    try:
        seconds = send(peer.dicom_port, peer.aet, folder)
        count = len(peer.instances())
    finally:
        peer.stop()
    if count != n:
        raise RuntimeError(f"Orthanc stored {count} of {n} instances")
    return {"cstore_s": seconds}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=275)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", type=Path, help="keep the simulated study and work dirs here")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON too")
    args = parser.parse_args()
    if not orthanc_available():
        print("Orthanc (or gcc for its loopback shim) is not installed", file=sys.stderr)
        return 2
    base = args.keep or Path(tempfile.mkdtemp(prefix="vg-bench-dicom-"))
    try:
        folder = base / "study"
        t0 = time.perf_counter()
        files = simulate_study(folder, args.slices, args.seed)
        megabytes = sum(p.stat().st_size for p in files) / 1e6
        print(
            f"study: {len(files)} instances, {megabytes:.1f} MB, simulated in "
            f"{time.perf_counter() - t0:.1f} s"
        )
        peers = ("voxelgate", "voxelgate-fsync", "orthanc", "orthanc-tuned")
        rows: dict[str, list[dict[str, float]]] = {p: [] for p in peers}
        for r in range(args.repeats):  # rotate the order so no peer always goes first
            for peer in peers[r % 4 :] + peers[: r % 4]:
                work = base / f"{peer}-{r}"
                if peer.startswith("voxelgate"):
                    fsync = peer.endswith("fsync")
                    rows[peer].append(run_ours(folder, work, len(files), fsync=fsync))
                else:
                    tuned = peer.endswith("tuned")
                    rows[peer].append(run_orthanc(folder, work, len(files), tuned=tuned))
                shutil.rmtree(work, ignore_errors=True)
        report = summarise(rows, len(files), megabytes)
        if args.json:
            print(json.dumps(report, indent=2))
    finally:
        if args.keep is None:
            shutil.rmtree(base, ignore_errors=True)
    return 0


def summarise(rows: dict[str, list[dict[str, float]]], n: int, megabytes: float) -> dict[str, Any]:
    report: dict[str, Any] = {"instances": n, "megabytes": round(megabytes, 1)}
    print(f"{'peer':28s} {'median s':>9s} {'inst/s':>8s} {'MB/s':>7s}   runs (s)")
    for label, peer, key in (
        ("voxelgate C-STORE", "voxelgate", "cstore_s"),
        ("voxelgate ingest after", "voxelgate", "ingest_s"),
        ("voxelgate C-STORE + ingest", "voxelgate", "total"),
        ("voxelgate C-STORE, fsync", "voxelgate-fsync", "cstore_s"),
        ("Orthanc C-STORE, as shipped", "orthanc", "cstore_s"),
        ("Orthanc C-STORE, tuned", "orthanc-tuned", "cstore_s"),
    ):
        if key == "total":
            runs = [row["cstore_s"] + row["ingest_s"] for row in rows[peer]]
        else:
            runs = [row[key] for row in rows[peer]]
        median = statistics.median(runs)
        report[label] = {
            "median_s": round(median, 3),
            "instances_per_s": round(n / median, 1),
            "mb_per_s": round(megabytes / median, 1),
            "runs_s": [round(x, 3) for x in runs],
        }
        print(
            f"{label:28s} {median:9.3f} {n / median:8.1f} {megabytes / median:7.1f}   "
            + " ".join(f"{x:.2f}" for x in runs)
        )
    ours = report["voxelgate C-STORE"]["median_s"]
    for label in ("Orthanc C-STORE, as shipped", "Orthanc C-STORE, tuned"):
        ratio = report[label]["median_s"] / ours
        report[f"speedup vs {label}"] = round(ratio, 2)
        print(f"C-STORE speed, voxelgate / {label}: {ratio:.2f}x")
    return report


if __name__ == "__main__":
    sys.exit(main())
