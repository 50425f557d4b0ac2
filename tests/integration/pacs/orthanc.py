"""A real Orthanc (Debian 1.10) for tests and benchmarks, reachable from this machine only.

Debian's Orthanc has no bind-address option and listens on all interfaces, so it always runs with
an ``LD_PRELOAD`` shim (``bindshim.c``, compiled once with gcc into a cache file) that rewrites a
wildcard ``bind()`` to loopback; after start the launcher checks that every listening socket of
the Orthanc process is on 127.0.0.1 / ::1 and kills it otherwise. Usable outside pytest::

    peer = OrthancPeer.start(tmp_dir, modalities={"gateway": ("VOXELGATE", "127.0.0.1", 11112)})
    try:
        peer.upload(paths)
        print(peer.instances())
    finally:
        peer.stop()
"""

from __future__ import annotations

import hashlib
import json as jsonlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ORTHANC_BIN = Path("/usr/sbin/Orthanc")
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
SHIM_SOURCE = Path(__file__).with_name("bindshim.c")

Modality = tuple[str, str, int]  # (AE title, host, port)


class OrthancError(RuntimeError):
    """Orthanc could not be started, answered an error, or listened beyond loopback."""


def orthanc_available() -> bool:
    """Whether the Debian Orthanc binary and a C compiler (for the bind shim) are installed."""
    return ORTHANC_BIN.is_file() and shutil.which("gcc") is not None


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (bind port 0, read it, close)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def bind_shim() -> Path:
    """Path of the compiled bind shim, built once per source version into a cache directory.

    Raises:
        OrthancError: When gcc is missing or fails.
    """
    source = SHIM_SOURCE.read_bytes()
    digest = hashlib.sha256(source).hexdigest()[:16]
    cache = Path(tempfile.gettempdir()) / f"voxelgate-bindshim-{os.getuid()}"
    cache.mkdir(mode=0o700, exist_ok=True)
    target = cache / f"bindshim-{digest}.so"
    if target.is_file():
        return target
    gcc = shutil.which("gcc")
    if gcc is None:
        raise OrthancError("gcc is needed to build the loopback bind shim")
    partial = cache / f".bindshim-{digest}-{os.getpid()}.so"
    done = subprocess.run(
        [gcc, "-shared", "-fPIC", "-O2", "-o", str(partial), str(SHIM_SOURCE), "-ldl"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if done.returncode != 0:
        raise OrthancError(f"building the bind shim failed: {done.stderr.strip()}")
    os.replace(partial, target)  # atomic: concurrent builders end with the same file
    return target


def _socket_inodes(pid: int) -> set[int]:
    inodes: set[int] = set()
    fd_dir = Path(f"/proc/{pid}/fd")
    for fd in fd_dir.iterdir():
        try:
            link = os.readlink(fd)
        except OSError:  # closed meanwhile
            continue
        if link.startswith("socket:["):
            inodes.add(int(link[8:-1]))
    return inodes


def _decode_address(hex_addr: str) -> str:
    """The textual IP of a /proc/net/tcp{,6} address field (little-endian 32-bit words)."""
    raw = bytes.fromhex(hex_addr)
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    family = socket.AF_INET if len(words) == 4 else socket.AF_INET6
    return socket.inet_ntop(family, words)


def listening_sockets(pid: int) -> list[tuple[str, int]]:
    """``(address, port)`` of every TCP socket in LISTEN state owned by process ``pid``."""
    owned = _socket_inodes(pid)
    found: list[tuple[str, int]] = []
    for table in ("tcp", "tcp6"):
        path = Path(f"/proc/{pid}/net/{table}")
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], int(fields[9])
            if state != "0A" or inode not in owned:  # 0A = TCP_LISTEN
                continue
            hex_addr, hex_port = local.split(":")
            found.append((_decode_address(hex_addr), int(hex_port, 16)))
    return found


def assert_loopback_only(pid: int) -> list[tuple[str, int]]:
    """Raise unless every listening socket of ``pid`` is bound to a loopback address.

    Returns:
        The listening sockets (all loopback).

    Raises:
        OrthancError: A socket listens on a non-loopback or wildcard address.
    """
    sockets = listening_sockets(pid)
    exposed = [(a, p) for a, p in sockets if not (a.startswith("127.") or a == "::1")]
    if exposed:
        raise OrthancError(f"process {pid} listens beyond loopback: {exposed}")
    return sockets


def _modality_entry(aet: str, host: str, port: int) -> dict[str, Any]:
    return {
        "AET": aet,
        "Host": host,
        "Port": port,
        "AllowEcho": True,
        "AllowFind": True,
        "AllowMove": True,
        "AllowGet": True,
        "AllowStore": True,
    }


def orthanc_config(
    workdir: Path,
    *,
    aet: str,
    http_port: int,
    dicom_port: int,
    modalities: Mapping[str, Modality],
    always_allow_query: bool,
    extra: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """The Orthanc JSON configuration: storage in ``workdir``, no auth, DICOMweb enabled."""
    config: dict[str, Any] = {
        "Name": f"voxelgate-test-{aet}",
        "StorageDirectory": str(workdir / "storage"),
        "IndexDirectory": str(workdir / "storage"),
        "StorageCompression": False,
        "HttpServerEnabled": True,
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "SslEnabled": False,
        "HttpThreadsCount": 20,
        "DicomServerEnabled": True,
        "DicomAet": aet,
        "DicomPort": dicom_port,
        "DicomCheckCalledAet": True,
        "DicomAlwaysAllowEcho": True,
        "DicomAlwaysAllowStore": True,
        "DicomAlwaysAllowFind": always_allow_query,
        "DicomAlwaysAllowGet": always_allow_query,
        "DicomAlwaysAllowMove": always_allow_query,
        "DicomScuTimeout": 20,
        "DicomScpTimeout": 30,
        "DicomModalities": {name: _modality_entry(*m) for name, m in modalities.items()},
        "DicomModalitiesInDatabase": False,
        "SaveJobs": False,
        "ConcurrentJobs": 2,
        "StableAge": 1,
        "Plugins": [str(DICOMWEB_PLUGIN)] if DICOMWEB_PLUGIN.is_file() else [],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True},
    }
    config.update(extra or {})
    return config


@dataclass
class OrthancPeer:
    """A running Orthanc; ``stop()`` it (the pytest fixture does).

    Attributes:
        aet: Its AE title.
        dicom_port: Its DICOM port on 127.0.0.1.
        http_port: Its HTTP (REST + DICOMweb) port on 127.0.0.1.
        workdir: Configuration, storage and log.
        proc: The Orthanc process.
    """

    aet: str
    dicom_port: int
    http_port: int
    workdir: Path
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def http_url(self) -> str:
        """Base URL of the REST API."""
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        """Base URL of the DICOMweb plugin (QIDO/WADO/STOW-RS)."""
        return f"{self.http_url}/dicom-web"

    @property
    def log_path(self) -> Path:
        """Orthanc's stdout/stderr."""
        return self.workdir / "orthanc.log"

    @classmethod
    def start(
        cls,
        tmp_dir: Path,
        *,
        modalities: Mapping[str, Modality] | None = None,
        aet: str = "ORTHANC",
        always_allow_query: bool = False,
        config: Mapping[str, Any] | None = None,
        timeout_s: float = 30.0,
    ) -> OrthancPeer:
        """Start Orthanc on free loopback ports and wait until its REST API answers.

        Args:
            tmp_dir: A fresh folder for configuration, storage and log.
            modalities: Peers Orthanc knows (``DicomModalities``): name -> (AE title, host,
                port), each allowed echo/find/move/get/store. C-MOVE destinations and (unless
                ``always_allow_query``) C-FIND/C-GET callers must be listed.
            aet: Orthanc's AE title.
            always_allow_query: Let unknown AEs C-FIND / C-GET / C-MOVE too.
            config: Extra top-level configuration keys (override the defaults).
            timeout_s: Bound on the start-up wait.

        Raises:
            OrthancError: It did not answer in time, exited, or listened beyond loopback.
        """
        if not ORTHANC_BIN.is_file():
            raise OrthancError(f"{ORTHANC_BIN} is not installed")
        shim = bind_shim()
        workdir = Path(tmp_dir)
        workdir.mkdir(parents=True, exist_ok=True)
        last_error = "not started"
        for _attempt in range(3):  # a free port can be taken between probe and bind
            peer = cls(aet=aet, dicom_port=free_port(), http_port=free_port(), workdir=workdir)
            cfg = orthanc_config(
                workdir,
                aet=aet,
                http_port=peer.http_port,
                dicom_port=peer.dicom_port,
                modalities=modalities or {},
                always_allow_query=always_allow_query,
                extra=config,
            )
            cfg_path = workdir / "orthanc.json"
            cfg_path.write_text(jsonlib.dumps(cfg, indent=2))
            env = {**os.environ, "LD_PRELOAD": str(shim)}
            with peer.log_path.open("ab") as log:
                peer.proc = subprocess.Popen(
                    [str(ORTHANC_BIN), str(cfg_path)],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    cwd=workdir,
                    start_new_session=True,
                )
            try:
                peer._wait_ready(timeout_s)
                return peer
            except OrthancError as exc:
                last_error = str(exc)
                exited = peer.proc.poll() is not None
                peer.stop()
                if not exited:  # hung or exposed: retrying will not help
                    raise
        raise OrthancError(f"Orthanc did not start: {last_error}")

    def _wait_ready(self, timeout_s: float) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise OrthancError(
                    f"Orthanc exited with {self.proc.returncode}: {self._log_tail()}"
                )
            try:
                self.rest("GET", "/system")
            except (OSError, OrthancError):
                time.sleep(0.1)
                continue
            if self._dicom_listening():
                sockets = assert_loopback_only(self.proc.pid)
                ports = {p for _, p in sockets}
                if not {self.http_port, self.dicom_port} <= ports:
                    raise OrthancError(f"Orthanc listens on {sockets}, not on its ports")
                return
            time.sleep(0.1)
        raise OrthancError(f"Orthanc did not answer within {timeout_s:.0f} s: {self._log_tail()}")

    def _dicom_listening(self) -> bool:
        assert self.proc is not None
        return any(p == self.dicom_port for _, p in listening_sockets(self.proc.pid))

    def _log_tail(self, n: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return "(no log)"

    def rest(
        self,
        method: str,
        path: str,
        json: Any = None,
        *,
        data: bytes | None = None,
        content_type: str | None = None,
        timeout_s: float = 60.0,
        raw: bool = False,
    ) -> Any:
        """Call the REST API; returns the decoded JSON answer (or bytes with ``raw``).

        Raises:
            OrthancError: On an HTTP error status (the message carries status and body).
        """
        headers = {}
        body = data
        if json is not None:
            body = jsonlib.dumps(json).encode()
            headers["Content-Type"] = "application/json"
        if content_type is not None:
            headers["Content-Type"] = content_type
        request = urllib.request.Request(
            self.http_url + path, data=body, method=method, headers=headers
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as answer:
                payload = answer.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")[:500]
            raise OrthancError(f"{method} {path}: HTTP {exc.code}: {detail}") from exc
        if raw:
            return payload
        return jsonlib.loads(payload) if payload.strip() else None

    def upload(self, paths: Iterable[Path]) -> list[str]:
        """Store DICOM files through ``POST /instances``; returns Orthanc's instance ids."""
        ids = []
        for path in paths:
            answer = self.rest(
                "POST", "/instances", data=Path(path).read_bytes(), content_type="application/dicom"
            )
            ids.append(str(answer["ID"]))
        return ids

    def instances(self) -> list[str]:
        """Orthanc ids of all stored instances."""
        return [str(i) for i in self.rest("GET", "/instances")]

    def studies(self) -> list[str]:
        """Orthanc ids of all stored studies."""
        return [str(i) for i in self.rest("GET", "/studies")]

    def instance_tags(self, orthanc_id: str) -> dict[str, Any]:
        """``/instances/{id}/simplified-tags`` of one instance."""
        return dict(self.rest("GET", f"/instances/{orthanc_id}/simplified-tags"))

    def sop_instance_uids(self) -> set[str]:
        """SOPInstanceUID of every stored instance."""
        return {
            str(self.rest("GET", f"/instances/{i}")["MainDicomTags"]["SOPInstanceUID"])
            for i in self.instances()
        }

    def add_modality(self, name: str, aet: str, host: str, port: int) -> None:
        """Register (or replace) a modality at run time (``PUT /modalities/{name}``)."""
        self.rest("PUT", f"/modalities/{name}", _modality_entry(aet, host, port))

    def clear(self) -> None:
        """Delete every stored patient (so a shared instance starts empty)."""
        for patient in self.rest("GET", "/patients"):
            self.rest("DELETE", f"/patients/{patient}")

    def stop(self, timeout_s: float = 15.0) -> None:
        """Terminate Orthanc (SIGTERM, then SIGKILL after ``timeout_s``)."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=timeout_s)
