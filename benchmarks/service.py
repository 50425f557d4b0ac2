"""Gateway benchmark: upload throughput and peak RSS, job-submit latency under concurrency.

Everything runs on this machine, on 127.0.0.1 only, each side in its own process: the gateway
(``python -m service.cli gateway``), a real Celery worker (``python -m service.cli worker``)
and the HTTP clients (this file re-run with an internal ``_upload`` / ``_phase`` command), so
that the clients' memory, CPU and event loop are not the gateway's.

1. **Upload.** A ~140 MB CT study built from real data: the three uncompressed 512x512 slices
   of ``../shared/data/dcmqi/ct-3slice`` written in turn ``--slices`` times (pydicom) with new
   SOPInstanceUIDs, one new study/series/frame-of-reference UID set and ImagePositionPatient
   shifted 1 mm per slice: one ~280-slice series. It is POSTed to ``/studies`` as one streamed
   multipart request (httpx, generator body with exact Content-Length; the client holds one
   256 KiB chunk at a time). Throughput = body bytes / (request start -> response): receive,
   validate, group, store, commit. Peak RSS of the gateway process tree: VmRSS of the process
   and its children sampled every 50 ms from /proc, cross-checked with the kernel's VmHWM;
   "growth" is the peak minus the idle RSS just before the upload.
   *Baseline*: the same bytes from the same client to a trivial uvicorn ASGI sink that streams
   the body to /dev/null (loopback + HTTP parsing only); the study size is the RSS reference.
   Targets (issue 3): >= 100 MB/s, peak RSS < 1.5x the study size.
2. **Submit latency.** A worker (concurrency 1, ``--worker-threads`` torch threads) is made
   busy with a long ``zeroshot-denoise`` job (``max_iterations = min_iterations = 20000``) on a
   small uploaded series. Then ``GET /health`` (*baseline*: one DB round trip, no auth) and
   ``POST /jobs`` are measured, first by one client (service time), then by ``--clients``
   concurrent clients (asyncio, one keep-alive connection each) each sending
   ``--requests`` requests (bounded in count and by ``--deadline`` seconds). The default
   client is a minimal asyncio HTTP/1.1 one (``--client httpx`` for httpx.AsyncClient, which
   costs ~10x the CPU per request). Per phase: latency percentiles, requests/s, CPU ms per
   request of gateway and client, and the cores used meanwhile by the gateway, the worker, the
   client, the PostgreSQL/Redis servers and everything else on the machine ("other": other
   users, kernel, and PostgreSQL backends that exited within the phase), plus the PostgreSQL
   connections opened. Target: p99 < 100 ms. All submitted jobs and the busy one are
   cancelled at the end.
   Backends: ``sqlite`` (the embedded default: SQLite job store + kombu SQLAlchemy broker on
   SQLite) and ``redis-pg`` (``redis://127.0.0.1:6379/7``, flushed before and after, and a
   temporary PostgreSQL database on 127.0.0.1:5432, dropped after).

``--profile-dir DIR`` runs the gateway under ``service_profile.py`` (a stand-in for py-spy):
per-call wall times of the submit path's functions (wrapped in the gateway process only; no
code changed), threadpool queueing, server-side request time, and wall-clock stack samples of
all threads, one snapshot per phase in ``DIR/gateway-<backend>.jsonl``; the main figures are
then not comparable (sampling costs the gateway CPU).

Usage:
  python benchmarks/service.py                       # both backends (redis-pg if reachable)
  python benchmarks/service.py --backends sqlite --slices 280 --clients 50 --requests 20
  python benchmarks/service.py --backends redis-pg --profile-dir /tmp/vgprof
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import httpx
from service_clients import (  # type: ignore[import-not-found]
    _cancel_all,
    _hammer,
    client_upload,
    run_async,
    sink_server,
)
from service_procs import (  # type: ignore[import-not-found]
    RssSampler,
    free_port,
    start,
    status_kb,
    stop,
    tree_rss,
    wait_http,
)

REPO = Path(__file__).resolve().parents[1]
CT_3SLICE = REPO.parent / "shared" / "data" / "dcmqi" / "ct-3slice"
REDIS_URL = "redis://127.0.0.1:6379/7"
PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/"
PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
HOST = "127.0.0.1"
MB = 1e6
ME = [sys.executable, str(Path(__file__).resolve())]
PROFILER = Path(__file__).resolve().with_name("service_profile.py")
CLI = [sys.executable, "-m", "service.cli"]


def make_series(out: Path, n_slices: int, source: Path = CT_3SLICE) -> int:
    """Write ``n_slices`` copies of the real slices as one new series; return its bytes."""
    import pydicom
    from pydicom.uid import generate_uid

    sources = [pydicom.dcmread(p) for p in sorted(source.glob("*.dcm"))]
    z0 = float(sources[0].ImagePositionPatient[2])
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    out.mkdir(parents=True, exist_ok=True)
    total = 0
    for k in range(n_slices):
        ds = sources[k % len(sources)]
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        x, y = (float(v) for v in ds.ImagePositionPatient[:2])
        ds.ImagePositionPatient = [x, y, z0 - k]
        ds.SliceLocation = z0 - k
        ds.InstanceNumber = k + 1
        path = out / f"IM{k + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        total += path.stat().st_size
    return total


# ---------------------------------------------------------------- processes and /proc


def helper(command: str, opts: dict[str, Any], timeout: float) -> Any:
    """Run this file's internal ``command`` in a new process; return its JSON answer."""
    done = subprocess.run(
        [*ME, command, json.dumps(opts)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{command} failed ({done.returncode}): {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- backends


@contextmanager
def backend(name: str, data_dir: Path) -> Iterator[dict[str, str]]:
    """VOXELGATE_* environment of one backend; its temporary PostgreSQL DB / Redis DB cleaned."""
    env = {**os.environ, "VOXELGATE_DATA_DIR": str(data_dir), "PYTHONUNBUFFERED": "1"}
    env.pop("VOXELGATE_DATABASE_URL", None)
    env.pop("VOXELGATE_BROKER_URL", None)
    if name == "sqlite":
        yield env
        return
    import psycopg
    import redis

    db = f"vgbench_{secrets.token_hex(4)}"
    r = redis.Redis.from_url(REDIS_URL, socket_timeout=5)
    r.flushdb()
    with psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=5) as conn:
        conn.execute(f'CREATE DATABASE "{db}"')
    try:
        env["VOXELGATE_DATABASE_URL"] = PG_URL + db
        env["VOXELGATE_BROKER_URL"] = REDIS_URL
        yield env
    finally:
        with (
            suppress(Exception),
            psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=5) as c,
        ):
            c.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
        with suppress(Exception):
            r.flushdb()
            r.close()


def pg_sessions(db: str) -> int:
    """Connections ever opened to PostgreSQL database ``db`` (0 if not PostgreSQL)."""
    if not db.startswith("vgbench_"):
        return 0
    import psycopg

    with psycopg.connect(PG_ADMIN, connect_timeout=5) as conn:
        row = conn.execute("SELECT sessions FROM pg_stat_database WHERE datname = %s", (db,))
        return int((row.fetchone() or (0,))[0])


def reachable(name: str) -> str | None:
    """None if the backend's servers answer, else why not."""
    if name == "sqlite":
        return None
    try:
        import psycopg
        import redis

        redis.Redis.from_url(REDIS_URL, socket_timeout=3).ping()
        with psycopg.connect(PG_ADMIN, connect_timeout=3):
            pass
    except Exception as exc:  # any failure means "skip this backend"; reported in the table
        return f"{type(exc).__name__}: {exc}"[:200]
    return None


# ---------------------------------------------------------------- one backend


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))] if values else 0.0


class Run:
    """The processes and figures of one backend's run."""

    def __init__(self, name: str, args: argparse.Namespace, work: Path) -> None:
        self.name, self.args, self.work = name, args, work
        self.result: dict[str, Any] = {"backend": name, "phases": []}
        self.gateway: subprocess.Popen[bytes] | None = None
        self.worker: subprocess.Popen[bytes] | None = None
        self.base, self.key = "", ""
        self.env: dict[str, str] = {}
        self.ids: list[str] = []
        self.profile = (
            Path(args.profile_dir) / f"gateway-{name}.jsonl" if args.profile_dir else None
        )

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    def upload(self, folder: Path) -> dict[str, Any]:
        up = helper(
            "_upload", {"url": f"{self.base}/studies", "key": self.key, "folder": str(folder)}, 900
        )
        if up["status"] != 201:
            raise RuntimeError(f"upload answered {up['status']}: {str(up['answer'])[:500]}")
        return up

    def bench_upload(self, env: dict[str, str], study: Path) -> None:
        port = free_port()
        sink = start([*ME, "_sink", str(port)], env, self.work / f"sink-{self.name}.log")
        try:
            wait_http(f"http://{HOST}:{port}/", sink)
            opts = {"url": f"http://{HOST}:{port}/", "key": "", "folder": str(study)}
            self.result["sink"] = helper("_upload", opts, 600)
            self.result["sink_rss"] = tree_rss(sink.pid)
        finally:
            stop(sink)
        httpx.get(f"{self.base}/studies", headers=self.auth, timeout=30).raise_for_status()
        time.sleep(1.0)
        self.result["idle_rss"] = tree_rss(self.gateway.pid)  # type: ignore[union-attr]
        with RssSampler(self.gateway.pid) as sampler:  # type: ignore[union-attr]
            up = self.upload(study)
        ans = up["answer"]
        self.result.update(
            upload=up,
            peak_rss=sampler.peak,
            rss_samples=sampler.samples,
            vmhwm=1024 * status_kb(self.gateway.pid, "VmHWM"),  # type: ignore[union-attr]
            stored=(
                ans["instances_stored"],
                ans["bytes_stored"],
                [len(s["series"]) for s in ans["studies"]],
            ),
        )
        up.pop("answer")

    def phase(
        self,
        label: str,
        clients: int,
        requests: int,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
    ) -> None:
        opts = {
            "url": self.base,
            "key": "" if path == "/health" else self.key,
            "method": method,
            "path": path,
            "body": body,
            "clients": clients,
            "requests": requests,
            "deadline": self.args.deadline,
            "client": self.args.client,
        }
        pids = {"gateway": self.gateway.pid}  # type: ignore[union-attr]
        if self.worker is not None:
            pids["worker"] = self.worker.pid
        db = self.env.get("VOXELGATE_DATABASE_URL", "").rsplit("/", 1)[-1] if self.env else ""
        connects = pg_sessions(db)
        res = helper("_phase", {**opts, "pids": pids}, self.args.deadline + 120)
        connects = pg_sessions(db) - connects
        self.ids += res["ids"]
        lat, wall = [1000 * v for v in res["latencies"]], res["wall"]
        cpu, n = res["cpu"], max(1, len(lat))
        row = {"label": label, "clients": clients, "n": len(lat), "rps": len(lat) / wall}
        row.update({f"p{q}": pct(lat, q) for q in (50, 90, 99)}, max=max(lat, default=0.0))
        row.update(gw_cpu_ms=1000 * cpu["gateway"] / n, client_cpu_ms=1000 * cpu["client"] / n)
        row.update(
            {
                f"{k}_cores": cpu.get(k, 0.0) / wall
                for k in ("gateway", "worker", "client", "db", "other")
            }
        )
        row["statuses"] = res["statuses"]
        row["pg_connects"] = connects
        self.result["phases"].append(row)
        self.snapshot(f"{label} x{clients}")

    def snapshot(self, label: str) -> None:
        """Have the profiled gateway write its figures since the last snapshot (bounded wait)."""
        if self.profile is None or self.gateway is None:
            return
        size = self.profile.stat().st_size if self.profile.exists() else 0
        self.profile.with_suffix(".label").write_text(label)
        os.kill(self.gateway.pid, signal.SIGUSR1)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and (
            not self.profile.exists() or self.profile.stat().st_size == size
        ):
            time.sleep(0.1)

    def bench_latency(self, env: dict[str, str], small: Path) -> None:
        series_id = self.upload(small)["answer"]["studies"][0]["series"][0]["id"]
        wenv = {**env, "VOXELGATE_TORCH_THREADS": str(self.args.worker_threads)}
        self.worker = start(
            [*CLI, "worker", "--queues", "gpu,cpu", "--concurrency", "1", "--name", self.name],
            wenv,
            self.work / f"worker-{self.name}.log",
        )
        busy = {
            "series_id": series_id,
            "pipeline": "zeroshot-denoise",
            "params": {"max_iterations": 20000, "min_iterations": 20000},
        }
        r = httpx.post(f"{self.base}/jobs", headers=self.auth, json=busy, timeout=30)
        r.raise_for_status()
        busy_id = r.json()["id"]
        self.ids.append(busy_id)
        self.result["busy_wait_s"] = self.wait_state(busy_id, {"running"}, 300)
        time.sleep(3.0)  # past loading, into the fit
        job = {
            "series_id": series_id,
            "pipeline": "zeroshot-denoise",
            "params": {"max_iterations": 50},
            "priority": 1,
        }
        c, n = self.args.clients, self.args.requests
        self.phase("GET /health (baseline)", 1, 100, "GET", "/health")
        self.phase("POST /jobs", 1, 100, "POST", "/jobs", job)
        self.phase("GET /health (baseline)", c, n, "GET", "/health")
        self.phase("POST /jobs", c, n, "POST", "/jobs", job)
        state = httpx.get(f"{self.base}/jobs/{busy_id}", headers=self.auth, timeout=30).json()
        self.result["busy_after"] = (state["state"], state["progress_percent"], state["step"])

    def wait_state(self, job_id: str, states: set[str], timeout: float) -> float:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.worker is not None and self.worker.poll() is not None:
                raise RuntimeError(f"worker exited with status {self.worker.returncode}")
            r = httpx.get(f"{self.base}/jobs/{job_id}", headers=self.auth, timeout=30)
            if r.json()["state"] in states:
                return time.monotonic() - t0
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} not in {states} after {timeout:.0f} s")

    def run(self, study: Path, small: Path) -> dict[str, Any]:
        with backend(self.name, self.work / f"data-{self.name}") as env:
            self.env = env
            try:
                keys = subprocess.run(
                    [*CLI, "keys", "create", "bench"],
                    env=env,
                    cwd=REPO,
                    capture_output=True,
                    text=True,
                    timeout=120,
                    check=True,
                )
                self.key = keys.stdout.strip().splitlines()[-1]
                port = free_port()
                self.base = f"http://{HOST}:{port}"
                cmd = [*CLI, "gateway", "--port", str(port)]
                if self.profile is not None:
                    self.profile.unlink(missing_ok=True)
                    cmd = [sys.executable, str(PROFILER), str(port), str(self.profile)]
                self.gateway = start(cmd, env, self.work / f"gateway-{self.name}.log")
                wait_http(f"{self.base}/health", self.gateway)
                self.snapshot("start-up")
                self.bench_upload(env, study)
                self.snapshot("upload")
                if not self.args.skip_latency:
                    self.bench_latency(env, small)
                return self.result
            finally:
                if self.ids and self.gateway is not None and self.gateway.poll() is None:
                    with suppress(Exception):
                        opts = {"url": self.base, "key": self.key, "ids": self.ids}
                        self.result["cancel"] = helper("_cancel", opts, 300)
                        self.wait_state(self.ids[0], {"cancelled", "failed", "succeeded"}, 60)
                stop(self.worker)
                stop(self.gateway)


# ---------------------------------------------------------------- report


def report(
    results: list[dict[str, Any]],
    skipped: dict[str, str],
    study_bytes: int,
    args: argparse.Namespace,
) -> None:
    print(
        f"\nvoxelgate gateway benchmark: {os.cpu_count()} CPU cores shared by the gateway, "
        f"the busy worker ({args.worker_threads} torch thread(s)) and the clients; loopback"
    )
    print(
        f"study: {args.slices} slices of 512x512 int16 (copies of dcmqi/ct-3slice), "
        f"{study_bytes / MB:.1f} MB of DICOM files"
    )
    print("\n1. Upload, one streamed multipart POST   targets: >= 100 MB/s, peak RSS < 1.5x study")
    print(
        f"{'backend':9s} {'receiver':33s} {'MB/s':>7s} {'s':>6s} {'peak RSS MB':>11s} "
        f"{'x study':>7s} {'growth MB':>9s}"
    )
    for r in results:
        s, u = r["sink"], r["upload"]
        peak = max(r["peak_rss"], r["vmhwm"])
        print(
            f"{r['backend']:9s} {'baseline: ASGI sink -> /dev/null':33s} "
            f"{s['bytes'] / MB / s['seconds']:7.1f} {s['seconds']:6.2f} "
            f"{r['sink_rss'] / MB:11.1f}"
        )
        print(
            f"{'':9s} {'gateway POST /studies':33s} {u['bytes'] / MB / u['seconds']:7.1f} "
            f"{u['seconds']:6.2f} {peak / MB:11.1f} {peak / study_bytes:7.2f} "
            f"{(peak - r['idle_rss']) / MB:9.1f}"
        )
        print(
            f"{'':9s}   body sent after {u['send_seconds']:.2f} s "
            f"({u['bytes'] / MB / u['send_seconds']:.0f} MB/s), answer after "
            f"{u['seconds']:.2f} s; idle RSS {r['idle_rss'] / MB:.1f} MB, sampled peak "
            f"{r['peak_rss'] / MB:.1f} MB ({r['rss_samples']} samples), VmHWM "
            f"{r['vmhwm'] / MB:.1f} MB; stored {r['stored'][0]} instances, "
            f"{r['stored'][1] / MB:.1f} MB, series per study {r['stored'][2]}"
        )
    if any(r["phases"] for r in results):
        print(
            f"\n2. Latency while the worker is busy on zeroshot-denoise ({args.client} client, one "
            f"connection per client)   target: p99 < 100 ms at {args.clients} concurrent clients"
        )
        cols = [  # key, width, format, header line 1, header line 2
            ("clients", 7, "d", "clients", ""),
            ("n", 5, "d", "n", ""),
            ("p50", 6, ".1f", "p50", "ms"),
            ("p90", 6, ".1f", "p90", "ms"),
            ("p99", 6, ".1f", "p99", "ms"),
            ("max", 6, ".1f", "max", "ms"),
            ("rps", 6, ".1f", "req/s", ""),
            ("gw_cpu_ms", 6, ".2f", "gw CPU", "ms/req"),
            ("client_cpu_ms", 6, ".2f", "cl CPU", "ms/req"),
            ("gateway_cores", 5, ".2f", "gw", "cores"),
            ("worker_cores", 5, ".2f", "wrkr", "cores"),
            ("client_cores", 5, ".2f", "cl", "cores"),
            ("db_cores", 5, ".2f", "db", "cores"),
            ("other_cores", 5, ".2f", "other", "cores"),
            ("pg_connects", 6, "d", "PG", "conns"),
        ]
        for line, first in ((3, "backend   request"), (4, "")):
            print(f"{first:33s} " + " ".join(f"{c[line]:>{c[1]}s}" for c in cols))
        for r in results:
            for p in r["phases"]:
                cells = [f"{p[c[0]]:{c[1]}{c[2]}}" for c in cols]
                extra = "" if set(p["statuses"]) <= {"200", "201"} else f"  {p['statuses']}"
                print(f"{r['backend']:9s} {p['label']:23s} " + " ".join(cells) + extra)
            if r["phases"]:
                print(
                    f"{'':9s} busy job afterwards: {r.get('busy_after')}; "
                    f"cancel answers: {r.get('cancel')}"
                )
    for name, why in skipped.items():
        print(f"\n{name}: not run ({why})")


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1].startswith("_"):
        cmd, arg = sys.argv[1], sys.argv[2]
        if cmd == "_sink":
            sink_server(int(arg))
        else:
            opts = json.loads(arg)
            answer = {
                "_upload": client_upload,
                "_phase": lambda o: run_async(_hammer(o)),
                "_cancel": lambda o: asyncio.run(_cancel_all(o)),
            }[cmd](opts)
            print(json.dumps(answer))
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backends", default="all", help="all | sqlite | redis-pg | sqlite,redis-pg")
    p.add_argument("--slices", type=int, default=280, help="slices of the upload study")
    p.add_argument("--busy-slices", type=int, default=12, help="slices of the busy job's series")
    p.add_argument("--clients", type=int, default=50)
    p.add_argument("--requests", type=int, default=20, help="requests per client")
    p.add_argument("--deadline", type=float, default=120.0, help="seconds per latency phase")
    p.add_argument(
        "--client",
        choices=("raw", "httpx"),
        default="raw",
        help="load generator: minimal asyncio HTTP/1.1 (default) or httpx.AsyncClient",
    )
    p.add_argument("--worker-threads", type=int, default=1, help="torch threads of the worker")
    p.add_argument("--skip-latency", action="store_true")
    p.add_argument("--profile-dir", help="profile the gateway (see above); figures then skewed")
    p.add_argument("--json", help="also write the raw results to this file")
    args = p.parse_args()
    names = ["sqlite", "redis-pg"] if args.backends == "all" else args.backends.split(",")
    if args.profile_dir:
        Path(args.profile_dir).mkdir(parents=True, exist_ok=True)
    skipped: dict[str, str] = {}
    results, failed = [], False
    with tempfile.TemporaryDirectory(prefix="vgbench-") as tmp:
        work = Path(tmp)
        study_bytes = make_series(work / "study", args.slices)
        make_series(work / "small", args.busy_slices)
        for name in names:
            why = reachable(name)
            if why is not None:
                if args.backends != "all":
                    raise SystemExit(f"{name} not reachable: {why}")
                skipped[name] = why
                continue
            print(f"running {name} ...", file=sys.stderr, flush=True)
            try:
                results.append(Run(name, args, work).run(work / "study", work / "small"))
            except Exception as exc:
                for log in sorted(work.glob(f"*-{name}.log")):
                    print(f"--- {log.name} (tail)\n{log.read_text()[-3000:]}", file=sys.stderr)
                skipped[name] = f"failed: {type(exc).__name__}: {exc}"[:600]
                failed = True
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    report(results, skipped, study_bytes, args)
    return 0 if results and not failed else 1


if __name__ == "__main__":
    sys.exit(main())
