"""Helpers of the server tests (both backends) and of `benchmarks/bench_serve.py`: a server process on 127.0.0.1, JSON
requests, a load of concurrent clients, and clients that go away mid-request."""

import contextlib
import json
import os
import socket
import statistics
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def running_server(command: list[str], port: int, log_path: Path, timeout: float = 300, env: dict | None = None):
    """Start a server process, wait until 127.0.0.1:`port`/health answers, stop it and its children afterwards."""
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}, start_new_session=True
        )
        try:
            deadline = time.monotonic() + timeout
            while True:
                if process.poll() is not None:
                    raise RuntimeError(
                        f"the server exited with {process.returncode}: {Path(log_path).read_text()[-3000:]}"
                    )
                with contextlib.suppress(OSError):
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
                        if response.status == 200:
                            break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no /health answer in {timeout} s: {Path(log_path).read_text()[-3000:]}")
                time.sleep(0.5)
            yield process
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, 15)  # its own process group: vLLM's engine core goes with it
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, 9)
                process.wait()


def request(port: int, route: str, payload=None, timeout: float = 300) -> tuple[int, dict]:
    """GET `route`, or POST `payload` (JSON-encoded, or raw bytes as given); (status, the JSON answer)."""
    data = payload if isinstance(payload, bytes) or payload is None else json.dumps(payload).encode()
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}{route}", data=data, headers={"Content-Type": "application/json"},
        method="GET" if data is None else "POST",
    )  # fmt: skip
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        body = error.read()
        return error.code, json.loads(body) if body else {}


def abandon_request(port: int, payload: dict, cut_body: bool) -> None:
    """Send a POST and hang up before the answer: after the whole body, or (`cut_body`) in the middle of it."""
    body = json.dumps(payload).encode()
    head = (
        f"POST /score HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head + (body[: len(body) // 2] if cut_body else body))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # close with RST


@dataclass
class LoadResult:
    """What `run_load` saw: one record per request sent (`index`, `status`, `answer`, `latency` s), the wall time."""

    records: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    def latencies_ms(self) -> list[float]:
        return sorted(1000 * r["latency"] for r in self.records if r["status"] == 200)

    def percentile_ms(self, q: float) -> float:
        values = self.latencies_ms()
        return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")

    def summary(self, rows_of: Callable[[int], int]) -> dict:
        ok = [r for r in self.records if r["status"] == 200]
        rows = sum(rows_of(r["index"]) for r in ok)
        return {
            "requests": len(ok), "rows": rows, "rows_per_s": rows / self.seconds,
            "p50_ms": statistics.median(self.latencies_ms()) if ok else float("nan"), "p99_ms": self.percentile_ms(0.99),
        }  # fmt: skip


def run_load(
    port: int, route: str, payload_of: Callable[[int], dict], clients: int, seconds: float, limit: int | None = None
) -> LoadResult:
    """`clients` threads, each sending requests one after the other for `seconds` (or until `limit` were sent in
    all); request `i` is `payload_of(i)`, each index sent exactly once."""
    result, lock, counter = LoadResult(), threading.Lock(), iter(range(10**9))
    deadline = time.monotonic() + seconds

    def client():
        while time.monotonic() < deadline:
            with lock:
                index = next(counter)
            if limit is not None and index >= limit:
                return
            start = time.monotonic()
            status, answer = request(port, route, payload_of(index))
            with lock:
                result.records.append(
                    {"index": index, "status": status, "answer": answer, "latency": time.monotonic() - start}
                )

    threads = [threading.Thread(target=client) for _ in range(clients)]
    begin = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    result.seconds = time.monotonic() - begin
    return result
