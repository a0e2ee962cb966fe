"""vLLM's own OpenAI-compatible server with the plugin (`python -m vllm.entrypoints.openai.api_server --runner
pooling`): `/pooling` and `/classify` return the ArmoRM vector [status, s, r, g, c] per input, equal to the
transformers model's outputs; a conversation without the gating pattern, or tokens that are not one prompt and one
answer, get their error status in valid JSON and the server keeps serving."""

import sys

import pytest


pytest.importorskip("vllm", reason="vLLM is not installed here: `make test-vllm` runs these in .venv-vllm")

from tests.serving.vllm.conftest import ENGINE  # noqa: E402
from tests.serving.vllm.test_plugin import assert_matches  # noqa: E402
from tests.serving_utils import free_port, request, running_server  # noqa: E402
from vllm_armorm import ArmoRMOutput, ErrorCode  # noqa: E402


def engine_flags() -> list[str]:
    flags = []
    for name, value in ENGINE.items():
        flag = "--" + name.replace("_", "-")
        flags += [flag] if value is True else [flag, str(value)]
    return flags


@pytest.fixture(scope="module")
def server(reference, tmp_path_factory):
    port = free_port()
    model = str(reference / "armorm")
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, *engine_flags()]
    command += ["--host", "127.0.0.1", "--port", str(port)]
    log = tmp_path_factory.mktemp("vllm-server") / "server.log"
    with running_server(command, port, log):
        yield port, model


def test_pooling_and_classify_endpoints_match_transformers(server, cases):
    port, model = server
    rows = cases["armorm"]["rows"]
    status, pooled = request(port, "/pooling", {"model": model, "input": [r["input_ids"] for r in rows]})
    assert status == 200, pooled
    status, classified = request(port, "/classify", {"model": model, "input": [r["input_ids"] for r in rows]})
    assert status == 200, classified
    for row, item, klass in zip(rows, pooled["data"], classified["data"]):
        assert_matches(ArmoRMOutput.from_vector(item["data"], row["name"]), row)
        assert_matches(ArmoRMOutput.from_vector(klass["probs"], row["name"]), row)


def test_pooling_renders_message_lists_with_the_template(server, cases):
    """Messages rendered by vLLM with the checkpoint's chat template (answers without markup: vLLM parses special
    tokens in the text, so untrusted answers go through `armorm serve`, which keeps markup as plain text)."""
    port, model = server
    for row in cases["armorm"]["rows"]:
        if row["name"] not in ("single-turn", "multi-turn", "unicode"):
            continue
        status, answer = request(port, "/pooling", {"model": model, "messages": row["messages"]})
        assert status == 200, answer
        assert_matches(ArmoRMOutput.from_vector(answer["data"][0]["data"], row["name"]), row)


def test_a_conversation_without_the_pattern_gets_its_status_and_the_server_goes_on(server, cases):
    port, model = server
    good = cases["armorm"]["rows"][0]
    cut = good["input_ids"][: good["gating_position"]]
    status, answer = request(port, "/classify", {"model": model, "input": [cut, good["input_ids"]]})
    assert status == 200, answer
    refused, scored = (item["probs"] for item in answer["data"])
    assert refused[0] == ErrorCode.NO_GATING_PATTERN and not any(refused[1:])
    assert_matches(ArmoRMOutput.from_vector(scored), good)
    status, answer = request(port, "/classify", {"model": model, "input": [good["input_ids"]]})
    assert status == 200
    assert_matches(ArmoRMOutput.from_vector(answer["data"][0]["probs"]), good)


def test_tokens_that_are_not_one_prompt_and_one_answer_get_their_status(server, cases):
    """The rows the transformers model refuses as not one prompt and one answer (a user turn after the answer; an
    answer that writes the assistant header, as token ids or in `messages`, whose special tokens vLLM parses) get
    status 4 and zeros; the row between them is scored as the model scores it."""
    port, model = server
    raw = {row["name"]: row for row in cases["armorm"]["raw"]}
    names = ("ends-with-a-user-turn", "one-prompt-one-answer", "answer-writes-the-header")
    status, answer = request(port, "/classify", {"model": model, "input": [raw[name]["input_ids"] for name in names]})
    assert status == 200, answer
    first, scored, last = (item["probs"] for item in answer["data"])
    for refused in (first, last):
        assert refused[0] == ErrorCode.NOT_ONE_PROMPT_AND_ONE_ANSWER and not any(refused[1:])
    assert_matches(ArmoRMOutput.from_vector(scored), raw["one-prompt-one-answer"])
    status, answer = request(
        port, "/pooling", {"model": model, "messages": raw["answer-writes-the-header"]["messages"]}
    )
    assert status == 200, answer
    refused = answer["data"][0]["data"]
    assert refused[0] == ErrorCode.NOT_ONE_PROMPT_AND_ONE_ANSWER and not any(refused[1:])
