"""Client and sink processes of benchmarks/service.py (each runs in its own process).

The upload client, the raw HTTP/1.1 connections that submit jobs concurrently, the cancel
helper, CPU snapshots and the ASGI sink that is the upload baseline.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
from service_procs import (  # type: ignore[import-not-found]
    HOST,
    machine_cpu,
    servers_cpu,
    tree_cpu,
)

CHUNK = 256 * 1024


def client_upload(opts: dict[str, Any]) -> dict[str, Any]:
    """One multipart POST of every ``*.dcm`` in ``folder``, streamed from a generator."""
    paths = sorted(Path(opts["folder"]).glob("*.dcm"))
    boundary = secrets.token_hex(16)
    heads = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{p.name}"\r\n'
        "Content-Type: application/dicom\r\n\r\n".encode()
        for p in paths
    ]
    tail = f"--{boundary}--\r\n".encode()
    length = sum(len(h) + p.stat().st_size + 2 for h, p in zip(heads, paths, strict=True))
    length += len(tail)
    sent: list[float] = []

    def body() -> Iterator[bytes]:
        for head, path in zip(heads, paths, strict=True):
            yield head
            with path.open("rb") as f:
                while chunk := f.read(CHUNK):
                    yield chunk
            yield b"\r\n"
        yield tail
        sent.append(time.perf_counter())

    headers = {
        "Content-Type": f"multipart/form-data; boundary={boundary}",
        "Content-Length": str(length),
    }
    if opts["key"]:
        headers["Authorization"] = f"Bearer {opts['key']}"
    with httpx.Client(timeout=httpx.Timeout(600.0)) as client:
        t0 = time.perf_counter()
        response = client.post(opts["url"], content=body(), headers=headers)
        t1 = time.perf_counter()
    try:
        answer = response.json()
    except ValueError:
        answer = {"text": response.text[:500]}
    return {
        "status": response.status_code,
        "bytes": length,
        "seconds": t1 - t0,
        "send_seconds": (sent[0] if sent else t1) - t0,
        "answer": answer,
    }


class RawConnection:
    """A minimal keep-alive HTTP/1.1 client connection (a cheap load generator).

    Sends one request at a time and reads the response by its Content-Length (the gateway's
    JSON answers always carry one); a tenth of httpx's CPU per request, so that on a small
    machine the clients take less of the cores the gateway needs.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> RawConnection:
        return cls(*await asyncio.open_connection(HOST, port))

    async def request(self, method: str, path: str, head: bytes, body: bytes) -> tuple[int, bytes]:
        self.writer.write(
            f"{method} {path} HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: {len(body)}\r\n".encode()
            + head
            + b"\r\n"
            + body
        )
        response = await self.reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in response.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        return int(response[9:12]), await self.reader.readexactly(length)

    def close(self) -> None:
        self.writer.close()


async def _hammer(opts: dict[str, Any]) -> dict[str, Any]:
    """``clients`` concurrent clients, one connection each, ``requests`` requests each."""
    clients, method, path = opts["clients"], opts["method"], opts["path"]
    head = f"Authorization: Bearer {opts['key']}\r\n".encode() if opts["key"] else b""
    body = json.dumps(opts["body"]).encode() if opts.get("body") else b""
    if body:
        head += b"Content-Type: application/json\r\n"
    port = int(opts["url"].rsplit(":", 1)[1])
    latencies: list[float] = []
    statuses: collections.Counter[str] = collections.Counter()
    ids: list[str] = []
    if opts["client"] == "httpx":
        pool = httpx.AsyncClient(
            base_url=opts["url"],
            timeout=30.0,
            limits=httpx.Limits(max_connections=clients, max_keepalive_connections=clients),
        )
        headers = {"Content-Type": "application/json"} if body else {}
        if opts["key"]:
            headers["Authorization"] = f"Bearer {opts['key']}"

        async def send(_: int) -> tuple[int, bytes]:
            r = await pool.request(method, path, content=body or None, headers=headers)
            return r.status_code, r.content

        await asyncio.gather(*(pool.get("/health") for _ in range(clients)))
    else:
        conns = [await RawConnection.open(port) for _ in range(clients)]

        async def send(i: int) -> tuple[int, bytes]:
            return await conns[i].request(method, path, head, body)

        # one request per connection first, so that connection set-up is not in the figures
        await asyncio.gather(*(c.request("GET", "/health", b"", b"") for c in conns))
    deadline = time.monotonic() + opts["deadline"]

    async def one_client(i: int) -> None:
        for _ in range(opts["requests"]):
            if time.monotonic() > deadline:
                return
            t = time.perf_counter()
            try:
                status, data = await asyncio.wait_for(send(i), 30.0)
            except (OSError, asyncio.IncompleteReadError, TimeoutError, httpx.HTTPError) as exc:
                statuses[type(exc).__name__] += 1
                return  # this client's connection is unusable now
            latencies.append(time.perf_counter() - t)
            statuses[str(status)] += 1
            if method == "POST" and status == 201:
                ids.append(json.loads(data)["id"])

    before = cpu_snapshot(opts["pids"])
    t0 = time.perf_counter()
    await asyncio.gather(*(one_client(i) for i in range(clients)))
    wall = time.perf_counter() - t0
    after = cpu_snapshot(opts["pids"])
    if opts["client"] == "httpx":
        await pool.aclose()
    else:
        for c in conns:
            c.close()
    cpu = {k: after[k] - before[k] for k in after if k != "servers"}
    cpu["db"] = sum(v - before["servers"].get(key, 0.0) for key, v in after["servers"].items())
    cpu["other"] = cpu.pop("machine") - sum(cpu.values())
    return {"latencies": latencies, "statuses": statuses, "ids": ids, "wall": wall, "cpu": cpu}


def run_async(coro: Any) -> Any:
    """Run ``coro`` on uvloop when installed (as uvicorn does), else on asyncio's loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def cpu_snapshot(pids: dict[str, int]) -> dict[str, Any]:
    """CPU seconds so far: the given process trees, this process, DB servers, the machine."""
    snap: dict[str, Any] = {name: tree_cpu(pid) for name, pid in pids.items()}
    snap["client"] = time.process_time()
    snap["servers"] = servers_cpu()
    snap["machine"] = machine_cpu()
    return snap


async def _cancel_all(opts: dict[str, Any], concurrency: int = 10) -> dict[str, int]:
    statuses: collections.Counter[str] = collections.Counter()
    sem = asyncio.Semaphore(concurrency)
    headers = {"Authorization": f"Bearer {opts['key']}"}
    async with httpx.AsyncClient(base_url=opts["url"], headers=headers, timeout=30.0) as client:

        async def one(job_id: str) -> None:
            async with sem:
                try:
                    statuses[str((await client.delete(f"/jobs/{job_id}")).status_code)] += 1
                except httpx.HTTPError as exc:
                    statuses[type(exc).__name__] += 1

        await asyncio.gather(*(one(i) for i in opts["ids"]))
    return dict(statuses)


def sink_server(port: int) -> None:
    """A trivial ASGI app: stream the request body to /dev/null, answer its length."""
    import uvicorn

    devnull = open(os.devnull, "wb")  # noqa: SIM115 - lives as long as the server

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        n, more = 0, True
        while more:
            message = await receive()
            chunk = message.get("body", b"")
            devnull.write(chunk)
            n += len(chunk)
            more = message.get("more_body", False)
        head = [(b"content-type", b"application/json")]
        await send({"type": "http.response.start", "status": 200, "headers": head})
        await send({"type": "http.response.body", "body": json.dumps({"bytes": n}).encode()})

    uvicorn.run(app, host=HOST, port=port, log_level="warning", lifespan="off")
