"""DICOM networking configuration as data: our listener, the peers we know, the routing rules.

One TOML file (``Settings.dicom_config``), read and validated here and nowhere else; rules are
data, never code. Example::

    [listener]
    ae_title = "VOXELGATE"
    host = "127.0.0.1"
    port = 11112
    tenant = "radiology"          # tenant that owns what the listener receives
    stable_age_s = 30             # a study is complete after this long without a new instance
    min_free_bytes = 2147483648   # refuse C-STORE (A700) when the disk has less free space

    [nodes.pacs]
    ae_title = "ORTHANC"
    host = "127.0.0.1"
    port = 4242
    dicomweb_url = "http://127.0.0.1:8042/dicom-web"
    send_via = "dimse"            # or "dicomweb" (STOW-RS) for deliveries to this node
    retrieve_via = "move"         # or "get", or "dicomweb" (WADO-RS)

    [[rules]]
    name = "ct-denoise"
    calling_ae = "ORTHANC"        # regular expressions, matched in full, case-insensitive
    modality = "CT"
    series_description = ".*(abd|chest).*"
    pipeline = "zeroshot-denoise"
    params = { epochs = 200 }
    priority = 6
    destinations = ["pacs"]

A peer may associate with the listener only when its AE title is that of a configured node
(unless ``listener.accept_unknown_calling_ae``); the called AE title must be the listener's.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from models.errors import InvalidParameters, VoxelgateError
from models.registry import get_spec, validate_params
from service.settings import Settings

GiB = 1024**3
_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # printable ASCII without backslash


def check_ae_title(value: str) -> str:
    """Return an AE title (stripped) if valid: 1-16 printable ASCII characters, no backslash.

    Raises:
        ValueError: When it is not.
    """
    stripped = value.strip()
    if not _AE_TITLE.match(value) or not stripped:
        raise ValueError(
            f"AE title must be 1-16 printable ASCII characters without '\\': {value!r}"
        )
    return stripped


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Listener(_Strict):
    """Our DICOM listener (``voxelgate scp``).

    Attributes:
        ae_title: Our AE title (the called AE title peers must use).
        host: Bind address.
        port: TCP port.
        tenant: Name of the tenant that owns received instances (created when missing).
        stable_age_s: Seconds without a new instance after which a study counts as complete.
        min_free_bytes: Free disk space under which C-STORE is refused (A700, out of resources).
        accept_unknown_calling_ae: Accept associations from AE titles that are no configured node.
        max_pdu: Largest PDU we receive, bytes (0: no limit).
        max_associations: Associations served at once.
        fsync_instances: Flush each received instance to disk (file and folder entry) before
            answering C-STORE: nothing answered is lost even on power failure, at the cost of
            two disk flushes per instance. Off: written atomically (a crashed listener never
            leaves a partial file), durable once the kernel writes it back, like Orthanc's files.
    """

    ae_title: str = "VOXELGATE"
    host: str = "127.0.0.1"
    port: int = Field(11112, ge=1, le=65535)
    tenant: str = "default"
    stable_age_s: float = Field(30.0, gt=0.0)
    min_free_bytes: int = Field(2 * GiB, ge=0)
    accept_unknown_calling_ae: bool = False
    max_pdu: int = Field(1_048_576, ge=0)
    max_associations: int = Field(16, ge=1, le=256)
    fsync_instances: bool = False

    @field_validator("ae_title")
    @classmethod
    def _ae(cls, value: str) -> str:
        return check_ae_title(value)


class Node(_Strict):
    """A remote DICOM peer (PACS, scanner, workstation).

    Attributes:
        name: The key of the node in the file (filled in by the loader).
        ae_title: Its AE title; empty for a DICOMweb-only node.
        host: Host of its DIMSE service.
        port: Port of its DIMSE service; ``None`` for a DICOMweb-only node.
        dicomweb_url: Base URL of its DICOMweb service (``.../dicom-web``), if any.
        send_via: How deliveries reach it: C-STORE (``dimse``) or STOW-RS (``dicomweb``).
        retrieve_via: How studies are pulled from it: C-MOVE to our listener, C-GET, or WADO-RS.
        may_send: Whether it may open associations to our listener (C-STORE, C-ECHO).
    """

    name: str = ""
    ae_title: str = ""
    host: str = "127.0.0.1"
    port: int | None = Field(None, ge=1, le=65535)
    dicomweb_url: str | None = None
    send_via: Literal["dimse", "dicomweb"] = "dimse"
    retrieve_via: Literal["move", "get", "dicomweb"] = "move"
    may_send: bool = True

    @field_validator("ae_title")
    @classmethod
    def _ae(cls, value: str) -> str:
        return check_ae_title(value) if value else ""

    @model_validator(mode="after")
    def _reachable(self) -> Node:
        dimse = bool(self.ae_title and self.port)
        if self.send_via == "dimse" and not dimse and self.dicomweb_url is None:
            raise ValueError("a node needs ae_title and port (DIMSE) or dicomweb_url")
        if self.send_via == "dicomweb" and not self.dicomweb_url:
            raise ValueError("send_via = 'dicomweb' needs dicomweb_url")
        if self.retrieve_via == "dicomweb" and not self.dicomweb_url:
            raise ValueError("retrieve_via = 'dicomweb' needs dicomweb_url")
        if self.retrieve_via in ("move", "get") and self.dicomweb_url is None and not dimse:
            raise ValueError(f"retrieve_via = {self.retrieve_via!r} needs ae_title and port")
        return self

    @property
    def has_dimse(self) -> bool:
        """Whether the node has a DIMSE service (AE title and port)."""
        return bool(self.ae_title and self.port)


class RoutingRule(_Strict):
    """When a received series matches, queue a pipeline on it and deliver the results.

    Every given pattern must match (regular expression, full match, case-insensitive); a missing
    pattern matches anything. All matching rules fire, each once per series.

    Attributes:
        name: Shown in job messages and the audit log.
        source: Arrival paths the rule applies to (``dimse``: C-STORE; ``stow``: STOW-RS).
        calling_ae: Pattern on the sender's AE title (``dimse`` only).
        called_ae: Pattern on the AE title the sender called (``dimse`` only).
        modality: Pattern on Modality.
        series_description: Pattern on SeriesDescription.
        body_part: Pattern on BodyPartExamined.
        pipeline: Pipeline to queue (a registry name).
        params: Its parameters (validated against the pipeline when the file is loaded).
        priority: 0..9, 9 most urgent.
        destinations: Node names the job's DICOM outputs are sent to once it succeeds.
    """

    name: str
    source: tuple[Literal["dimse", "stow"], ...] = ("dimse", "stow")
    calling_ae: str | None = None
    called_ae: str | None = None
    modality: str | None = None
    series_description: str | None = None
    body_part: str | None = None
    pipeline: str
    params: dict[str, Any] = Field(default_factory=dict)
    priority: int = Field(5, ge=0, le=9)
    destinations: tuple[str, ...] = ()

    @field_validator("calling_ae", "called_ae", "modality", "series_description", "body_part")
    @classmethod
    def _regex(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"not a regular expression: {value!r} ({exc})") from exc
        return value

    @model_validator(mode="after")
    def _pipeline(self) -> RoutingRule:
        try:
            validate_params(get_spec(self.pipeline), self.params)
        except VoxelgateError as exc:  # unknown pipeline or invalid parameters
            raise ValueError(str(exc)) from exc
        return self


class DicomConfig(_Strict):
    """The whole DICOM configuration (see the module docstring for the file format)."""

    listener: Listener = Field(default_factory=Listener)
    nodes: dict[str, Node] = Field(default_factory=dict)
    rules: tuple[RoutingRule, ...] = ()

    @model_validator(mode="before")
    @classmethod
    def _name_nodes(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("nodes"), dict):
            data = dict(data)
            data["nodes"] = {
                name: {**node, "name": name} if isinstance(node, dict) else node
                for name, node in data["nodes"].items()
            }
        return data

    @model_validator(mode="after")
    def _destinations_known(self) -> DicomConfig:
        for rule in self.rules:
            unknown = [d for d in rule.destinations if d not in self.nodes]
            if unknown:
                raise ValueError(f"rule {rule.name!r}: unknown destination node(s) {unknown}")
        return self

    def node(self, name: str) -> Node:
        """The node called ``name``.

        Raises:
            InvalidParameters: When no node has that name (the message lists the known ones).
        """
        try:
            return self.nodes[name]
        except KeyError:
            known = ", ".join(sorted(self.nodes)) or "none configured"
            raise InvalidParameters(f"unknown DICOM node {name!r}; known nodes: {known}") from None

    def node_by_ae(self, ae_title: str) -> Node | None:
        """The first node whose AE title is ``ae_title`` (after stripping spaces), if any."""
        wanted = ae_title.strip()
        return next((n for n in self.nodes.values() if n.ae_title == wanted), None)


def parse_dicom_config(text: str, origin: str = "DICOM configuration") -> DicomConfig:
    """Parse and validate the TOML text of a DICOM configuration.

    Raises:
        InvalidParameters: Invalid TOML or content; the message names ``origin`` and the fields.
    """
    try:
        return DicomConfig.model_validate(tomllib.loads(text))
    except tomllib.TOMLDecodeError as exc:
        raise InvalidParameters(f"{origin}: not valid TOML: {exc}") from exc
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '(top)'}: {e['msg']}" for e in exc.errors()
        )
        raise InvalidParameters(f"{origin}: {problems}") from exc


@dataclass(frozen=True)
class _Cached:
    path: Path | None
    mtime_ns: int
    config: DicomConfig


_cache: list[_Cached] = []


def load_dicom_config(settings: Settings) -> DicomConfig:
    """The DICOM configuration of ``settings`` (re-read when the file changes).

    Returns:
        The parsed configuration; the defaults (a listener, no nodes, no rules) without a file.

    Raises:
        InvalidParameters: The file is missing, unreadable or invalid.
    """
    path = settings.dicom_config
    if path is None:
        return DicomConfig()
    try:
        mtime = path.stat().st_mtime_ns
        if _cache and _cache[0].path == path and _cache[0].mtime_ns == mtime:
            return _cache[0].config
        config = parse_dicom_config(path.read_text(encoding="utf-8"), str(path))
    except OSError as exc:
        raise InvalidParameters(f"DICOM configuration {path}: {exc.strerror}") from exc
    _cache[:] = [_Cached(path, mtime, config)]
    return config
