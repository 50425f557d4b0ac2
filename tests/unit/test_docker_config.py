"""The Docker files run the same commands the tests run, on the queues the registry names.

No Docker engine runs here: these tests read docker/compose.yaml and the Dockerfiles, parse
every container command with the real ``voxelgate`` argument parser, and, where a compose
binary is installed (.ci/run installs Debian's ``docker-compose``), run ``compose config``,
which resolves the file offline exactly as ``docker compose up`` would.
"""

from __future__ import annotations

import importlib.metadata
import json
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from models.registry import IO_QUEUE, WORKER_QUEUES, all_specs
from service.cli import build_parser
from service.dicom.config import parse_dicom_config

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "compose.yaml"
DOCKERFILES = {
    "gateway": DOCKER / "gateway.Dockerfile",
    "worker": DOCKER / "worker.Dockerfile",
}
CLI_COMMANDS = {"gateway", "worker", "serve", "db", "keys", "scp", "pacs"}
VOXELGATE_SERVICES = ("migrate", "gateway", "scp", "worker-gpu", "worker-cpu", "worker-io")
WORKER_SERVICES = ("worker-gpu", "worker-cpu", "worker-io")
TORCH_PACKAGES = {"torch", "monai", "torchvision", "nvidia-cudnn-cu12", "nvidia-cudnn-cu13"}


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return data


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    logical: list[str] = []
    pending = ""
    for raw in dockerfile.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    assert not pending, f"{dockerfile.name}: dangling line continuation"
    out = []
    for line in logical:
        keyword, _, args = line.partition(" ")
        out.append((keyword.upper(), args.strip()))
    return out


def exec_form(args: str, where: str) -> list[str]:
    """A JSON exec-form argument list (``["voxelgate", "gateway"]``), the only form allowed."""
    try:
        argv = json.loads(args)
    except json.JSONDecodeError:
        pytest.fail(f"{where}: {args!r} is not in JSON exec form")
    assert isinstance(argv, list), where
    assert all(isinstance(a, str) for a in argv), where
    return argv


def image_cmd(name: str) -> list[str]:
    cmds = [args for kw, args in instructions(DOCKERFILES[name]) if kw == "CMD"]
    assert cmds, f"{name}.Dockerfile has no CMD"
    return exec_form(cmds[-1], f"{name}.Dockerfile CMD")


def assert_voxelgate_command(argv: list[str], where: str) -> None:
    """The command is ``voxelgate <subcommand> ...`` and the real CLI parser accepts it."""
    assert argv[:1] == ["voxelgate"], f"{where}: {argv} does not run voxelgate"
    assert len(argv) > 1, f"{where}: no subcommand"
    assert argv[1] in CLI_COMMANDS, f"{where}: {argv[1]!r} is not one of {sorted(CLI_COMMANDS)}"
    try:
        build_parser().parse_args(argv[1:])
    except SystemExit as exc:
        pytest.fail(f"{where}: `{' '.join(argv)}` is rejected by service.cli (exit {exc.code})")


def queues_of(argv: list[str]) -> list[str]:
    for i, arg in enumerate(argv):
        if arg == "--queues":
            return argv[i + 1].split(",")
        if arg.startswith("--queues="):
            return arg.split("=", 1)[1].split(",")
    pytest.fail(f"{argv} names no --queues")


def registry_queues() -> set[str]:
    return {spec.queue for spec in all_specs()} | set(WORKER_QUEUES)


# --- commands --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_image_cmd_parses_with_the_cli(name: str) -> None:
    assert_voxelgate_command(image_cmd(name), f"{name}.Dockerfile CMD")


def test_image_cmds_are_the_documented_ones() -> None:
    assert image_cmd("gateway") == ["voxelgate", "gateway"]
    assert image_cmd("worker") == ["voxelgate", "worker", "--queues", "gpu"]


@pytest.mark.parametrize("service", VOXELGATE_SERVICES)
def test_compose_command_parses_with_the_cli(service: str) -> None:
    spec = compose()["services"][service]
    argv = spec["command"]
    assert isinstance(argv, list), f"{service}: command must be a list (exec form)"
    assert_voxelgate_command(argv, f"compose service {service}")


def test_compose_commands_per_service() -> None:
    services = compose()["services"]
    assert services["migrate"]["command"] == ["voxelgate", "db", "upgrade"]
    assert services["gateway"]["command"] == image_cmd("gateway")
    assert services["worker-gpu"]["command"] == image_cmd("worker")
    cpu = services["worker-cpu"]["command"]
    assert cpu[:2] == ["voxelgate", "worker"]
    assert cpu[cpu.index("--concurrency") + 1] == "1"


def test_readme_commands_parse_with_the_cli() -> None:
    """Every ``docker compose run ... voxelgate ...`` line of docker/README.md is a real command."""
    text = (DOCKER / "README.md").read_text()
    found = re.findall(r"docker compose .*?run --rm \S+ (voxelgate [^\n`#]*)", text)
    assert any(cmd.split()[1] == "keys" for cmd in found), "README shows no key creation"
    for cmd in found:
        assert_voxelgate_command(cmd.split(), f"docker/README.md: {cmd}")


# --- queues, GPUs ----------------------------------------------------------------------------


@pytest.mark.parametrize("service", WORKER_SERVICES)
def test_worker_queues_are_registry_queues(service: str) -> None:
    queues = queues_of(compose()["services"][service]["command"])
    assert queues, service
    assert set(queues) <= registry_queues(), f"{service}: {queues} vs {sorted(registry_queues())}"


def test_image_worker_queues_are_registry_queues() -> None:
    assert set(queues_of(image_cmd("worker"))) <= registry_queues()


def test_every_registry_queue_has_a_worker() -> None:
    served: set[str] = set()
    for service in WORKER_SERVICES:
        served |= set(queues_of(compose()["services"][service]["command"]))
    needed = {spec.queue for spec in all_specs()} | {IO_QUEUE}
    assert needed <= served, f"no compose worker consumes {sorted(needed - served)}"


def test_gpu_worker_reserves_a_gpu_and_cpu_worker_does_not() -> None:
    services = compose()["services"]
    devices = services["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    assert "deploy" not in services["worker-cpu"]
    assert services["worker-cpu"]["environment"]["CUDA_VISIBLE_DEVICES"] == ""


# --- wiring ----------------------------------------------------------------------------------


def host_ip_default(port: str) -> str:
    """Host address of a short-syntax port, ``${VAR:-127.0.0.1}`` read as its default."""
    match = re.match(r"\$\{\w+:-([^}]*)\}:|([\d.]+):[^/]+:\d+(/tcp|/udp)?$", port)
    assert match, f"port {port!r} does not name a host address"
    return match.group(1) if match.group(1) is not None else match.group(2)


def test_published_ports_bind_loopback_by_default() -> None:
    for name, spec in compose()["services"].items():
        for port in spec.get("ports", []):
            assert isinstance(port, str), f"{name}: use the short port syntax"
            assert host_ip_default(port) == "127.0.0.1", f"{name}: {port}"
    published = {name for name, spec in compose()["services"].items() if spec.get("ports")}
    assert published == {"gateway", "scp"}, "only gateway and listener are published"


def test_every_voxelgate_service_reads_the_one_dicom_config() -> None:
    services = compose()["services"]
    mount = "./dicom.toml:/etc/voxelgate/dicom.toml:ro"
    for name in VOXELGATE_SERVICES:
        env = services[name]["environment"]
        assert env["VOXELGATE_DICOM_CONFIG"] == "/etc/voxelgate/dicom.toml", name
        if name != "migrate":
            assert mount in services[name]["volumes"], name
    config = parse_dicom_config((DOCKER / "dicom.toml").read_text(), "docker/dicom.toml")
    assert config.listener.host == "0.0.0.0"  # inside the container; published on loopback
    scp_port = services["scp"]["ports"][0].rsplit(":", 1)[1]
    assert int(scp_port) == config.listener.port


def test_environment_and_shared_blob_volume() -> None:
    services = compose()["services"]
    for name in VOXELGATE_SERVICES:
        env = services[name]["environment"]
        assert env["VOXELGATE_DATABASE_URL"].startswith("postgresql+psycopg://"), name
        assert "@postgres:5432/" in env["VOXELGATE_DATABASE_URL"], name
        assert env["VOXELGATE_BROKER_URL"] == "redis://redis:6379/0", name
        assert env["VOXELGATE_DATA_DIR"] == "/data", name
    for name in ("gateway", *WORKER_SERVICES):
        assert "voxelgate-data:/data" in services[name]["volumes"], name
    assert "voxelgate-data" in compose()["volumes"]


def test_redis_persists_and_postgres_is_checked() -> None:
    services = compose()["services"]
    redis = services["redis"]
    cmd = redis["command"]
    assert cmd[cmd.index("--appendonly") + 1] == "yes"
    assert any(v.endswith(":/data") for v in redis["volumes"])
    assert services["redis"]["image"].startswith("redis:7")
    postgres = services["postgres"]
    assert postgres["image"].startswith("postgres:15")
    assert "pg_isready" in postgres["healthcheck"]["test"]
    assert any(v.endswith(":/var/lib/postgresql/data") for v in postgres["volumes"])


def test_start_order() -> None:
    services = compose()["services"]
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["migrate"]["restart"] == "no"
    for name in ("gateway", *WORKER_SERVICES):
        deps = services[name]["depends_on"]
        assert deps["migrate"]["condition"] == "service_completed_successfully", name
        assert deps["redis"]["condition"] == "service_healthy", name


def test_no_secret_is_committed() -> None:
    text = COMPOSE.read_text()
    assert "POSTGRES_PASSWORD: ${POSTGRES_PASSWORD:?" in text
    assert not re.search(r"postgresql\+psycopg://\w+:[^$@]+@", text), "literal password"
    example = (DOCKER / ".env.example").read_text()
    assert re.search(r"^POSTGRES_PASSWORD=change-me", example, re.MULTILINE)
    assert ".env" in (DOCKER / ".gitignore").read_text().split()


# --- images ----------------------------------------------------------------------------------


def pip_installs(name: str) -> list[str]:
    return [
        args
        for kw, args in instructions(DOCKERFILES[name])
        if kw == "RUN" and "pip install" in args
    ]


def test_gateway_image_installs_no_torch() -> None:
    text = " ".join(args for _, args in instructions(DOCKERFILES["gateway"]))
    assert "torch" not in text.lower()
    assert "compute" not in text
    assert "[" not in " ".join(pip_installs("gateway")), "the gateway installs no extras"
    assert any(re.search(r"pip install \.(\s|$)", run) for run in pip_installs("gateway"))


def test_base_dependencies_pull_no_torch() -> None:
    """What ``pip install .`` installs (the gateway image) reaches no torch, even transitively.

    Walks the installed distributions' metadata from pyproject's base dependencies, with the
    extras each requirement asks for, evaluating environment markers for this interpreter.
    """
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    todo = [Requirement(r) for r in pyproject["project"]["dependencies"]]
    seen: set[tuple[str, frozenset[str]]] = set()
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        assert name not in TORCH_PACKAGES, f"the base dependencies reach {req.name}"
        key = (name, frozenset(req.extras))
        if key in seen:
            continue
        seen.add(key)
        try:
            requires = importlib.metadata.requires(req.name) or []
        except importlib.metadata.PackageNotFoundError:
            continue  # not installed here: its marker excluded it, or it's optional elsewhere
        for text in requires:
            sub = Requirement(text)
            if sub.marker is None or any(
                sub.marker.evaluate({"extra": extra}) for extra in {"", *req.extras}
            ):
                todo.append(sub)
    assert ("fastapi", frozenset()) in seen


def torch_pin(text: str) -> str:
    match = re.search(r"torch==([\w.]+)", text) or re.search(r"TORCH_VERSION=([\w.]+)", text)
    assert match, "no torch pin"
    return match.group(1)


def test_worker_image_installs_compute_with_ci_torch() -> None:
    runs = " ".join(pip_installs("worker"))
    assert '".[compute]"' in runs or "'.[compute]'" in runs or ".[compute]" in runs
    worker = DOCKERFILES["worker"].read_text()
    assert torch_pin(worker) == torch_pin((ROOT / ".ci" / "run").read_text())
    base = [args for kw, args in instructions(DOCKERFILES["worker"]) if kw == "ARG"]
    assert any(a.startswith("CUDA_IMAGE=nvidia/cuda:") for a in base)


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_images_run_as_the_same_non_root_user(name: str) -> None:
    steps = instructions(DOCKERFILES[name])
    users = [args for kw, args in steps if kw == "USER"]
    assert users, f"{name}: runs as root"
    assert users[-1].split(":")[0] not in {"root", "0"}
    assert any("--uid 10001" in args for kw, args in steps if kw == "RUN"), name


def test_gateway_healthcheck_uses_health_route() -> None:
    checks = [args for kw, args in instructions(DOCKERFILES["gateway"]) if kw == "HEALTHCHECK"]
    assert len(checks) == 1
    _, _, cmd = checks[0].partition("CMD ")
    argv = exec_form(cmd, "HEALTHCHECK")
    assert argv[:2] == ["python", "-c"]
    assert "urllib.request" in argv[2]
    assert "/health" in argv[2]
    compile(argv[2], "<healthcheck>", "exec")


# --- compose config (offline, where a compose binary exists) ---------------------------------


def compose_binary() -> list[str] | None:
    docker = shutil.which("docker")
    if docker:
        probe = subprocess.run(
            [docker, "compose", "version"], capture_output=True, text=True, check=False
        )
        if probe.returncode == 0:
            return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


def compose_config(binary: list[str], folder: Path) -> subprocess.CompletedProcess[str]:
    """``compose config`` on folder/compose.yaml with folder/.env, in a clean environment."""
    return subprocess.run(
        [*binary, "-f", str(folder / "compose.yaml"), "config"],
        capture_output=True,
        text=True,
        check=False,
        cwd=folder,
        env={"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(folder)},
    )


def short_port_host(port: Any) -> str:
    if isinstance(port, dict):
        return str(port.get("host_ip", ""))
    return str(port).rsplit(":", 2)[0]


def test_compose_config_resolves(tmp_path: Path) -> None:
    binary = compose_binary()
    if binary is None:
        pytest.skip("no `docker compose` or `docker-compose` binary here")
    # The documented flow: docker/.env is made from .env.example next to compose.yaml.
    shutil.copy(COMPOSE, tmp_path / "compose.yaml")
    shutil.copy(DOCKER / ".env.example", tmp_path / ".env")
    run = compose_config(binary, tmp_path)
    assert run.returncode == 0, run.stderr
    resolved = yaml.safe_load(run.stdout)["services"]
    assert set(resolved) == {"redis", "postgres", *VOXELGATE_SERVICES}
    assert [short_port_host(p) for p in resolved["gateway"]["ports"]] == ["127.0.0.1"]
    url = resolved["gateway"]["environment"]["VOXELGATE_DATABASE_URL"]
    assert url.startswith("postgresql+psycopg://voxelgate:change-me")
    for name in VOXELGATE_SERVICES:
        assert_voxelgate_command(resolved[name]["command"], f"resolved {name}")


def test_compose_config_refuses_a_missing_password(tmp_path: Path) -> None:
    binary = compose_binary()
    if binary is None:
        pytest.skip("no `docker compose` or `docker-compose` binary here")
    shutil.copy(COMPOSE, tmp_path / "compose.yaml")
    (tmp_path / ".env").write_text("VOXELGATE_BIND_ADDRESS=127.0.0.1\n")
    run = compose_config(binary, tmp_path)
    assert run.returncode != 0
    assert "POSTGRES_PASSWORD" in run.stderr
