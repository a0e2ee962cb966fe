"""`armorm serve` under requests that try to stall it (issue 18): a body over `--max-body-mb` is refused with a 413, a
conversation too long for the model is refused before it is tokenized whole while small requests keep flowing, a
client that hangs up costs no forward for its queued rows, and any JSON body gets a score or a 4xx.

Bounded in count and time: each load runs for a few seconds, the property test draws a fixed number of bodies."""

import dataclasses
import json
import math
import os
import socket
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from serving import backends
from serving.serve import ServeConfig, build_app, build_service
from tests.serving.test_serve import MARKUP, checkpoint, pool  # noqa: F401  (`checkpoint` is a fixture)
from tests.serving_utils import LoadResult, abandon_request, free_port, request, run_load, running_server


REPO = Path(__file__).resolve().parents[2]
MAX_BODY_MB = 2
# Over the character bound of the tiny backbone (4096 positions × the 128 characters of Llama-3's longest token), and
# under the body limit: refused by its length, not by its size.
LONG_ANSWER = "a" * 1_500_000
# The small requests' load, alone and during a stream of long ones: rounds of one window of each, alternating; 6 rounds
# of 1.5 s give each side a few hundred requests on 2 busy cores, so that its p99 is not its one slowest request.
LOAD_ROUNDS, LOAD_WINDOW_S = 6, 1.5


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):  # noqa: F811
    folder, _, _ = checkpoint
    port = free_port()
    command = [sys.executable, "-m", "armorm_cli", "serve", "--model", str(folder), "--port", str(port)]
    command += ["--max-batch-rows", "8", "--max-wait-ms", "5", "--max-body-mb", str(MAX_BODY_MB)]
    env = {"PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}
    with running_server(command, port, tmp_path_factory.mktemp("serve") / "server.log", env=env):
        yield port


def raw_post(port: int, head: str, body: bytes = b"") -> tuple[int, dict]:
    """POST /score by hand (a declared length the body need not match); the status and the JSON answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(head.encode() + b"\r\n" + body)
        answer = b""
        while b"\r\n\r\n" not in answer or len(answer.split(b"\r\n\r\n", 1)[1]) < content_length(answer):
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    status = int(answer.split(b" ", 2)[1])
    return status, json.loads(answer.split(b"\r\n\r\n", 1)[1] or b"{}")


def content_length(answer: bytes) -> int:
    for line in answer.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":")[1])
    return 0


def test_a_body_over_the_limit_is_refused_with_413(server):
    limit = MAX_BODY_MB * 2**20
    # Declared too large: refused before a byte of it is read.
    head = f"POST /score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {100 * limit}\r\n"
    status, answer = raw_post(server, head)
    assert status == 413 and "`--max-body-mb`" in answer["error"] and str(limit) in answer["error"], (status, answer)
    # Sent in chunks with no declared length: refused once it passes the limit.
    piece = b'{"conversations": ["' + b"a" * (limit + 10) + b'"]}'
    chunked = f"{len(piece):x}\r\n".encode() + piece + b"\r\n0\r\n\r\n"
    head = "POST /score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n"
    status, answer = raw_post(server, head, chunked)
    assert status == 413 and "`--max-body-mb`" in answer["error"], (status, answer)
    assert request(server, "/health")[0] == 200


def test_small_requests_flow_while_a_long_conversation_is_refused(server):
    """A 1.5 MB answer is refused by its length, without being tokenized and without a row of its request reaching a
    forward; meanwhile the p99 latency of small requests stays within 2× their p99 alone (before the limits a small
    request waited 4.9 s).

    The windows alone and during alternate, and each side's p99 is taken over its pooled windows, so that the load of
    whatever else runs on the machine falls on both alike. The long body is encoded once: `json.dumps` of 1.5 MB per
    request would hold this process's GIL, which the small clients share, and slow them here, not in the server."""
    conversations = pool()
    small = lambda i: {"conversations": [conversations[i % len(conversations)]]}  # noqa: E731
    long_body = {"conversations": [conversations[0], [*conversations[1][:-1], {"role": "assistant", "content": ""}]]}
    long_body["conversations"][1][-1]["content"] = LONG_ANSWER
    body = json.dumps(long_body).encode()
    head = f"POST /score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    run_load(server, "/score", small, clients=2, seconds=0.5)  # warm up
    rows_before = request(server, "/info")[1]["stats"]["rows"]
    alone, during, refusals = [], [], []

    def large_client(stop: threading.Event):
        while not stop.is_set():
            start = time.monotonic()
            refusals.append((*raw_post(server, head, body), time.monotonic() - start))

    for _ in range(LOAD_ROUNDS):
        alone += run_load(server, "/score", small, clients=2, seconds=LOAD_WINDOW_S).records
        stop = threading.Event()
        thread = threading.Thread(target=large_client, args=(stop,))
        thread.start()
        try:
            during += run_load(server, "/score", small, clients=2, seconds=LOAD_WINDOW_S).records
        finally:
            stop.set()
            thread.join()
    assert refusals and all(status == 422 for status, _, _ in refusals), refusals[:1]
    assert all(record["status"] == 200 for record in alone + during)
    p99_alone, p99_during = LoadResult(alone).percentile_ms(0.99), LoadResult(during).percentile_ms(0.99)
    assert p99_during <= 2 * p99_alone, (p99_alone, p99_during, len(alone), len(during), len(refusals))
    assert max(seconds for _, _, seconds in refusals) < 1.0, refusals
    assert "conversation 1" in refusals[0][1]["error"] and "characters" in refusals[0][1]["error"], refusals[0][1]
    # Only the small requests' rows were scored: the refused requests' first row never reached the backend's queue.
    assert request(server, "/info")[1]["stats"]["rows"] - rows_before == len(alone) + len(during)


@pytest.fixture
def in_process_server(checkpoint, monkeypatch):  # noqa: F811
    """The app of `armorm serve` in a thread of this process, whose forwards wait for `gate` to open."""
    import uvicorn

    folder, _, _ = checkpoint
    gate = threading.Event()
    score_encoded = backends.score_encoded

    def gated(*args, **kwargs):
        assert gate.wait(timeout=60)
        return score_encoded(*args, **kwargs)

    monkeypatch.setattr(backends, "score_encoded", gated)
    port = free_port()
    app = build_app(build_service(ServeConfig(model=str(folder), max_batch_rows=8, max_wait_ms=5)))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
            time.sleep(0.05)
        yield port, gate
    finally:
        gate.set()
        server.should_exit = True
        thread.join(timeout=30)


def test_clients_that_hang_up_cost_no_forward(in_process_server):
    """While a forward runs, 10 clients send 50 conversations each and hang up: their rows, still queued, are never
    scored (the server's row count grows by the one row of the client that waited)."""
    port, gate = in_process_server
    conversations = pool()
    answers = []
    waiting = threading.Thread(target=lambda: answers.append(request(port, "/score", {"conversations": [pool()[0]]})))
    waiting.start()
    deadline = time.monotonic() + 30
    while request(port, "/info")[1]["stats"]["batches"] < 1:  # the forward has started and waits for the gate
        assert time.monotonic() < deadline
        time.sleep(0.02)
    for i in range(10):
        abandon_request(port, {"conversations": [conversations[(i + j) % 20] for j in range(50)]}, cut_body=False)
    time.sleep(1.0)  # the server notices the hang-ups
    gate.set()
    waiting.join(timeout=60)
    assert answers and answers[0][0] == 200, answers
    time.sleep(0.5)  # any forward of the abandoned rows would run now
    stats = request(port, "/info")[1]["stats"]
    assert stats["rows"] == 1, stats


@pytest.fixture(scope="module")
def client(checkpoint):  # noqa: F811
    from fastapi.testclient import TestClient

    folder, _, _ = checkpoint
    app = build_app(build_service(ServeConfig(model=str(folder), max_batch_rows=8, max_wait_ms=1)))
    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client


# Text a policy or a scraper gives: markup, a lone surrogate, a long answer under the bound, one over it.
STRINGS = ["", "Paris.", MARKUP, "\ud83d", "é💥🦀", "NaN", "word " * 4000, LONG_ANSWER]
text = st.one_of(st.text(max_size=30), st.sampled_from(STRINGS))
json_value = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | text,
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(st.sampled_from(["role", "content", "x"]), children, max_size=3)
    ),
    max_leaves=8,
)
message = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant", "assistant", "tool"]), "content": text | json_value}
)
messages = st.lists(message, max_size=4)
# Well-formed conversations (a prompt, then the answer) often enough that odd text reaches the tokenizer and the model.
scorable = st.builds(
    lambda prompt, answer: [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}], text, text
)
# OpenRLHF's form: the query is the prompt followed by the response.
openrlhf = st.lists(st.tuples(text, text), min_size=1, max_size=3).map(
    lambda pairs: {"query": [p + r for p, r in pairs], "prompts": [p for p, _ in pairs]}
)
body = st.one_of(
    st.fixed_dictionaries({"conversations": st.lists(scorable, min_size=1, max_size=3)}),
    st.fixed_dictionaries({"prompts": st.lists(text, min_size=1, max_size=2)}).flatmap(
        lambda d: st.fixed_dictionaries(
            {
                "prompts": st.just(d["prompts"]),
                "completions": st.lists(text, min_size=len(d["prompts"]), max_size=len(d["prompts"])),
            }
        )
    ),
    openrlhf,
    st.fixed_dictionaries({"conversations": st.lists(messages | json_value, max_size=3)}),
    st.fixed_dictionaries(
        {"prompts": st.lists(text | messages, max_size=3), "completions": st.lists(text | messages, max_size=3)}
    ),
    st.fixed_dictionaries({"query": st.lists(text | json_value, max_size=3), "prompts": st.lists(text, max_size=3)}),
    st.dictionaries(st.sampled_from(["conversations", "prompts", "completions", "query", "labels"]), json_value),
    json_value,
)


@settings(
    max_examples=80,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)
@given(route=st.sampled_from(["/score", "/get_reward"]), payload=body)
def test_any_json_body_gets_a_score_or_a_4xx(client, route, payload):
    response = client.post(route, content=json.dumps(payload), headers={"Content-Type": "application/json"})
    answer = response.json()
    if response.status_code == 200:
        scores = answer["scores"] if route == "/score" else answer["rewards"]
        assert scores and all(math.isfinite(s) for s in scores), answer
    else:
        assert 400 <= response.status_code < 500, (response.status_code, answer)
        assert answer.get("error") or answer.get("detail"), answer
    assert client.get("/health").status_code == 200


def test_the_checkpoint_path_stays_private(client, checkpoint):  # noqa: F811
    folder, _, _ = checkpoint
    info = client.get("/info").json()
    assert info["model"] == Path(folder).name and str(Path(folder).parent) not in json.dumps(info), info


def test_a_non_finite_score_is_a_500_that_names_the_row(client, monkeypatch):
    conversations = pool()[:3]
    real = client.app.state.service.backend.score

    async def overflowing(rows):
        out = await real(rows)
        score = out.score.clone()
        score[1] = torch.nan  # a backbone that overflows on row 1
        return dataclasses.replace(out, score=score)

    monkeypatch.setattr(client.app.state.service.backend, "score", overflowing)
    response = client.post("/score", json={"conversations": conversations})
    assert response.status_code == 500 and "conversation 1" in response.json()["error"], response.text


def test_a_backbone_overflow_fails_only_its_request_naming_its_row(client, monkeypatch):
    """The model's own check (`NonFiniteScoreError`, rows of the merged batch) becomes a 500 naming the row of the
    request that holds it; a request without it keeps its scores."""
    from modeling_armorm import NonFiniteScoreError

    score_encoded = backends.score_encoded

    def overflowing(model, rows, *args, **kwargs):
        bad = [i for i, row in enumerate(rows) if len(row.input_ids) == len(overflow.input_ids)]
        if bad:
            raise NonFiniteScoreError("overflow", rows=bad)
        return score_encoded(model, rows, *args, **kwargs)

    conversations = pool()
    overflow = client.app.state.service.encoder.encode(conversations[2])
    monkeypatch.setattr(backends, "score_encoded", overflowing)
    response = client.post("/score", json={"conversations": conversations[:3]})
    assert response.status_code == 500 and "conversation 2" in response.json()["error"], response.text
    response = client.post("/score", json={"conversations": conversations[:2]})
    assert response.status_code == 200, response.text
