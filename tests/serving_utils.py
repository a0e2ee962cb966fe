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


def save_served_checkpoint(folder, objective_names: list[str]):
    """A tiny ArmoRM (Llama-3 tokenizer, verbosity objective 2, `sensitive_gating`) saved with its tokenizer in
    `folder`, as the server tests serve it; returns (model, tokenizer)."""
    import torch

    from tests.utils import llama3_tokenizer, tiny_armorm, tiny_llama_config

    torch.set_num_threads(1)
    tokenizer = llama3_tokenizer()
    model = tiny_armorm(
        tiny_llama_config(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id), tokenizer=tokenizer,
        objective_names=objective_names, verbosity_objective=2,
    )  # fmt: skip
    sensitive_gating(model, seed=0)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model, tokenizer


def sensitive_gating(model, seed: int) -> None:
    """Gating weights that make g depend strongly on h_x: the default initialisation (std 0.02, temperature 10) gives
    a nearly uniform g whatever h_x is, and a test on it could not tell a right prompt feature from a wrong one."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    layers = model.gating.layers
    with torch.no_grad():
        for i, layer in enumerate(layers):
            scale = (15.0 if i == len(layers) - 1 else 2.0) / layer.in_features**0.5
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator) * scale)
            layer.bias.zero_()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def running_server(
    command: list[str],
    port: int,
    log_path: Path,
    timeout: float = 300,
    env: dict | None = None,
    route: str = "/health",
):
    """Start a server process, wait until 127.0.0.1:`port``route` answers, stop it and its children afterwards."""
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
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}{route}", timeout=5) as response:
                        if response.status == 200:
                            break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no {route} answer in {timeout} s: {Path(log_path).read_text()[-3000:]}")
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


MALFORMED = [
    b"{not json",
    b'{"conversations": "a string"}',
    b'{"conversations": [[{"role": "tool", "content": "x"}]]}',
    b'{"conversations": [[{"role": "user", "content": "hi"}]]}',
    b'{"conversations": []}',
    b'{"prompts": ["a"], "completions": ["b", "c"]}',
    b'{"conversations": [[{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]]}',
]


def assert_close_scores(got: list[float], expected: list[float], where: str) -> None:
    assert len(got) == len(expected), where
    for a, b in zip(got, expected):
        assert abs(a - b) <= 1e-5 + 1e-4 * abs(b), (where, got, expected)


def load_with_faults(
    port: int, conversations: list, expected_scores: list[float], clients: int = 4, seconds: float = 8.0
) -> LoadResult:
    """`clients` clients send `/score` requests of 1–3 conversations of the pool for `seconds`, while one more sends
    malformed requests and others hang up mid-request. Asserts: every request answered once (200, or 422 for the
    malformed ones), every score equal to the offline score of its conversation, the server's row count equal to the
    rows sent (nothing lost, nothing scored twice), and the server still answering afterwards."""
    n = len(conversations)

    def rows_of(index: int) -> list[int]:
        return [(index * 7 + j * 3) % n for j in range(1 + index % 3)]

    _, before = request(port, "/info")
    stop, refusals = threading.Event(), []
    faults = {"abandoned_full": 0, "abandoned_rows": 0}

    def adversary():  # records what it saw; the test thread checks it (an assert here would not fail the test)
        i = 0
        while not stop.is_set():
            refusals.append(request(port, "/score", MALFORMED[i % len(MALFORMED)]))
            payload = {"conversations": [conversations[j] for j in rows_of(i)]}
            abandon_request(port, payload, cut_body=bool(i % 2))
            if not i % 2:
                faults["abandoned_full"] += 1
                faults["abandoned_rows"] += len(rows_of(i))
            i += 1
            time.sleep(0.05)

    thread = threading.Thread(target=adversary)
    thread.start()
    try:
        result = run_load(
            port, "/score", lambda i: {"conversations": [conversations[j] for j in rows_of(i)]}, clients, seconds
        )
    finally:
        stop.set()
        thread.join()
    indices = sorted(r["index"] for r in result.records)
    assert indices == list(range(len(indices))), "a request was lost or answered twice"
    for record in result.records:
        assert record["status"] == 200, record
        assert_close_scores(
            record["answer"]["scores"],
            [expected_scores[j] for j in rows_of(record["index"])],
            f"request {record['index']}",
        )
    assert refusals and faults["abandoned_full"] > 0
    for status, answer in refusals:
        assert status == 422 and ("error" in answer or "detail" in answer), (status, answer)
    time.sleep(1.0)  # the abandoned requests' rows finish
    _, after = request(port, "/info")
    sent = sum(len(rows_of(r["index"])) for r in result.records)
    scored = after["stats"]["rows"] - before["stats"]["rows"]
    assert sent <= scored <= sent + faults["abandoned_rows"], (sent, scored, faults)
    status, answer = request(port, "/score", {"conversations": [conversations[0]]}, timeout=60)
    assert status == 200
    assert_close_scores(answer["scores"], expected_scores[:1], "after the load")
    return result
