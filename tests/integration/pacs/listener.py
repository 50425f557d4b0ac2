"""Start the real ``voxelgate scp`` as a subprocess for tests (and the benchmark).

Usable by every PACS test::

    from tests.integration.pacs.listener import scp_factory  # noqa: F401  (pytest fixture)

    def test_x(scp_factory, sqlite_settings):
        scp = scp_factory(sqlite_settings, nodes={"pacs": node("ORTHANC", port=4242)})
        ...  # scp.port, scp.ae_title, scp.log()

Outside pytest: ``ScpProcess.start(settings, tmp_dir, ...)`` / ``.stop()``. The listener binds
127.0.0.1 on a free port; every wait is bounded; ``stop`` sends SIGTERM, then SIGKILL.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import service_env

REPO = Path(__file__).resolve().parents[3]
LISTENER_AE = "VOXELGATE"
SENDER_AE = "STORESCU"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def node(ae_title: str, port: int | None = None, **extra: Any) -> dict[str, Any]:
    """A ``[nodes.<name>]`` table: DIMSE peer on 127.0.0.1 (``port`` None: may send only)."""
    table: dict[str, Any] = {"ae_title": ae_title, "host": "127.0.0.1"}
    if port is not None:
        table["port"] = port
    else:
        table["port"] = 104  # never called: a sender that we never connect to
    table.update(extra)
    return table


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def config_toml(
    listener: Mapping[str, Any],
    nodes: Mapping[str, Mapping[str, Any]] = {},
    rules: Sequence[Mapping[str, Any]] = (),
) -> str:
    """The TOML text of a DICOM configuration (see :mod:`service.dicom.config`)."""
    lines = ["[listener]", *(f"{k} = {_toml_value(v)}" for k, v in listener.items())]
    for name, table in nodes.items():
        lines += ["", f"[nodes.{name}]", *(f"{k} = {_toml_value(v)}" for k, v in table.items())]
    for rule in rules:
        lines += ["", "[[rules]]", *(f"{k} = {_toml_value(v)}" for k, v in rule.items())]
    return "\n".join(lines) + "\n"


child_env = service_env
"""Environment giving a child process the same settings (VOXELGATE_* variables)."""


@dataclass
class ScpProcess:
    """A running ``voxelgate scp``."""

    proc: subprocess.Popen[bytes]
    port: int
    ae_title: str
    config_path: Path
    log_path: Path
    settings: Any

    @classmethod
    def start(
        cls,
        settings: Any,
        tmp_dir: Path,
        *,
        nodes: Mapping[str, Mapping[str, Any]] | None = None,
        rules: Sequence[Mapping[str, Any]] = (),
        port: int | None = None,
        timeout_s: float = 60.0,
        **listener: Any,
    ) -> ScpProcess:
        """Write a config and start the listener; returns once it accepts connections.

        Args:
            settings: Settings of the child (data_dir, database_url, broker_url ...).
            tmp_dir: Where the config file and the log go.
            nodes: Node tables (default: one sender ``storescu`` with AE ``STORESCU``).
            rules: Routing rule tables.
            port: Listener port (default: a free one).
            timeout_s: Longest wait for the listener to come up.
            **listener: Other ``[listener]`` keys (stable_age_s, min_free_bytes, tenant ...).
        """
        tmp_dir.mkdir(parents=True, exist_ok=True)
        port = port or free_port()
        table = {"ae_title": LISTENER_AE, "host": "127.0.0.1", "port": port, **listener}
        nodes = {"storescu": node(SENDER_AE)} if nodes is None else nodes
        config_path = tmp_dir / f"dicom-{port}.toml"
        config_path.write_text(config_toml(table, nodes, rules), encoding="utf-8")
        log_path = tmp_dir / f"scp-{port}.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "service.cli", "scp", "--config", str(config_path)],
                cwd=REPO,
                env=child_env(settings),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        scp = cls(proc, port, str(table["ae_title"]), config_path, log_path, settings)
        scp._wait_ready(timeout_s)
        return scp

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"voxelgate scp exited: {self.log()}")
            if "listening on" in self.log():
                with socket.socket() as s:
                    s.settimeout(1)
                    if s.connect_ex(("127.0.0.1", self.port)) == 0:
                        return
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"voxelgate scp did not come up in {timeout_s:.0f} s: {self.log()}")

    def log(self, tail: int | None = 6000) -> str:
        """The listener's output (its last ``tail`` characters; ``None``: all of it)."""
        text = self.log_path.read_text(errors="replace")
        return text if tail is None else text[-tail:]

    def alive(self) -> bool:
        """Whether the process still runs."""
        return self.proc.poll() is None

    def stop(self, timeout_s: float = 20.0) -> int | None:
        """SIGTERM (then SIGKILL after ``timeout_s``); returns the exit status."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        return self.proc.returncode


@dataclass
class ScpFactory:
    """Starts listeners for one test and stops them all afterwards."""

    tmp: Path
    started: list[ScpProcess] = field(default_factory=list)

    def __call__(self, settings: Any, **kwargs: Any) -> ScpProcess:
        scp = ScpProcess.start(settings, self.tmp / f"scp{len(self.started)}", **kwargs)
        self.started.append(scp)
        return scp


@pytest.fixture
def scp_factory(tmp_path: Path) -> Iterator[ScpFactory]:
    """Factory fixture: ``scp_factory(settings, nodes=..., rules=..., stable_age_s=...)``."""
    factory = ScpFactory(tmp_path)
    yield factory
    for scp in factory.started:
        scp.stop()


def dcmtk(tool: str) -> str:
    """Path of a dcmtk tool (not pynetdicom's same-named app in the venv); skip when absent."""
    venv_bin = Path(sys.prefix) / "bin"
    for folder in os.environ.get("PATH", "").split(os.pathsep):
        candidate = Path(folder) / tool
        if folder and Path(folder) != venv_bin and candidate.is_file():
            head = candidate.read_bytes()[:4]
            if head == b"\x7fELF":
                return str(candidate)
    pytest.skip(f"dcmtk {tool} is not installed")


def storescu(
    port: int,
    paths: Sequence[Path],
    *,
    calling_ae: str = SENDER_AE,
    called_ae: str = LISTENER_AE,
    extra: Sequence[str] = (),
    timeout_s: float = 120.0,
) -> subprocess.CompletedProcess[str]:
    """Run dcmtk's ``storescu`` (one association) against 127.0.0.1:``port``."""
    cmd = [dcmtk("storescu"), "-aet", calling_ae, "-aec", called_ae, *extra, "127.0.0.1", str(port)]
    cmd += [str(p) for p in paths]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)


@contextmanager
def association(
    port: int,
    abstract_syntaxes: Sequence[str],
    transfer_syntaxes: Sequence[str] | None = None,
    *,
    calling_ae: str = SENDER_AE,
    called_ae: str = LISTENER_AE,
) -> Iterator[Any]:
    """A pynetdicom association to 127.0.0.1:``port`` (released on exit unless aborted).

    Files passed to ``assoc.send_c_store(path)`` are sent as they are encoded (pynetdicom's
    chunked send: the file meta gives the UIDs and the transfer syntax; nothing is re-encoded).
    """
    from pynetdicom import AE, DEFAULT_TRANSFER_SYNTAXES, _config

    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    for syntax in abstract_syntaxes:
        if transfer_syntaxes is None:  # one context per syntax: any uncompressed file fits
            for transfer_syntax in DEFAULT_TRANSFER_SYNTAXES:
                ae.add_requested_context(syntax, transfer_syntax)
        else:
            ae.add_requested_context(syntax, list(transfer_syntaxes))
    saved = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    assoc = ae.associate("127.0.0.1", port, ae_title=called_ae)
    try:
        yield assoc
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = saved
        if assoc.is_established:
            assoc.release()
        ae.shutdown()


def sop_class(path: Path) -> str:
    """MediaStorageSOPClassUID of a file."""
    import pydicom

    return str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.MediaStorageSOPClassUID)


def store_counts(settings: Any) -> tuple[int, int]:
    """(instances, jobs) in the job store of ``settings``."""
    from sqlalchemy import func, select

    from service.store.db import session_scope
    from service.store.tables import Instance, Job

    with session_scope(settings.resolved_database_url) as session:
        instances = session.scalar(select(func.count(Instance.id))) or 0
        jobs = session.scalar(select(func.count(Job.id))) or 0
    return int(instances), int(jobs)


def wait_for(predicate: Any, timeout_s: float, what: str, period_s: float = 0.2) -> Any:
    """Poll ``predicate`` until truthy or fail the test after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(period_s)
    pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}")
