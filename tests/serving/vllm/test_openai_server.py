"""vLLM's own OpenAI-compatible server with the plugin (`python -m vllm.entrypoints.openai.api_server --runner
pooling --io-processor-plugin armorm`): `/classify` and `/pooling` return the reward [s] per input, the transformers
model's score, read as verl's reward loop reads it (`probs[-1]`) and as a single-label client reads it (`probs[0]`);
the same server answers a `/pooling` request with a `data` field with the full vector [status, s, r, g, c] per input,
the transformers model's outputs; a conversation that cannot be scored (no gating pattern, tokens that are not one
prompt and one answer) is an error for its own HTTP request on every route, the requests served beside it get their
scores and the server keeps serving."""

import sys
from concurrent.futures import ThreadPoolExecutor

import pytest


pytest.importorskip("vllm", reason="vLLM is not installed here: `make test-vllm` runs these in .venv-vllm")

from tests.serving.vllm.conftest import ENGINE  # noqa: E402
from tests.serving.vllm.test_plugin import assert_matches, assert_score  # noqa: E402
from tests.serving_utils import free_port, request, running_server  # noqa: E402


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
    command += ["--io-processor-plugin", "armorm"]  # `/pooling` with `data`: the full vector
    command += ["--host", "127.0.0.1", "--port", str(port)]
    log = tmp_path_factory.mktemp("vllm-server") / "server.log"
    with running_server(command, port, log):
        yield port, model


def verl_reward(port: int, model: str, tokenizer, messages: list[dict]) -> float:
    """What verl's reward loop does with a discriminative reward model on vLLM (`RewardLoopWorker.compute_score_disrm`,
    verl/experimental/reward_loop/reward_loop.py): render the chat as text, drop the leading BOS that vLLM's
    tokenization adds again (verl drops it always, for Llama tokenizers, which add it; this test tokenizer does not,
    so it is kept), POST that one input to `/classify` with `"activation": False`, and take the last value of `probs`
    of the last item."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=False, tokenize=False)
    adds_bos = tokenizer("x")["input_ids"][:1] == [tokenizer.bos_token_id]
    if adds_bos and tokenizer.bos_token is not None and text.startswith(tokenizer.bos_token):
        text = text[len(tokenizer.bos_token) :]
    status, output = request(port, "/classify", {"model": model, "input": text, "activation": False})
    assert status == 200, output
    return output["data"][-1]["probs"][-1]


def concurrently(port: int, route: str, payloads: list[dict]) -> list[tuple[int, dict]]:
    """Every payload its own HTTP request, all in flight at once (vLLM batches them into the same engine steps)."""
    with ThreadPoolExecutor(len(payloads)) as pool:
        return list(pool.map(lambda payload: request(port, route, payload), payloads))


def test_classify_and_pooling_return_the_score_alone(server, cases):
    """One value per input, the transformers model's score, raw: some references exceed 1, where a sigmoid cannot
    land, and they differ, where a softmax over one value (always 1) could not."""
    port, model = server
    rows = cases["armorm"]["rows"]
    assert max(r["score"] for r in rows) > 1 and len({r["score"] for r in rows}) > 1
    status, classified = request(port, "/classify", {"model": model, "input": [r["input_ids"] for r in rows]})
    assert status == 200, classified
    status, pooled = request(port, "/pooling", {"model": model, "input": [r["input_ids"] for r in rows]})
    assert status == 200, pooled
    for row, item, pooled_item in zip(rows, classified["data"], pooled["data"]):
        assert item["num_classes"] == 1 and len(item["probs"]) == 1, item
        assert_score(item["probs"][-1], row)  # verl
        assert_score(item["probs"][0], row)  # a single-label client
        (pooled_score,) = pooled_item["data"]
        assert_score(pooled_score, row)


def test_classify_read_as_verl_reads_it(server, cases):
    """verl's request: the chat rendered as text by the reward model's tokenizer, tokenized by vLLM."""
    from transformers import PreTrainedTokenizerFast

    port, model = server
    tokenizer = PreTrainedTokenizerFast.from_pretrained(model)  # the reward model's tokenizer, without its config
    for row in cases["armorm"]["rows"]:
        if row["name"] in ("single-turn", "multi-turn", "unicode"):
            assert_score(verl_reward(port, model, tokenizer, row["messages"]), row)


def test_pooling_renders_message_lists_with_the_template(server, cases):
    """Messages rendered by vLLM with the checkpoint's chat template (answers without markup: vLLM parses special
    tokens in the text, so untrusted answers go through `armorm serve`, which keeps markup as plain text)."""
    port, model = server
    for row in cases["armorm"]["rows"]:
        if row["name"] not in ("single-turn", "multi-turn", "unicode"):
            continue
        status, answer = request(port, "/pooling", {"model": model, "messages": row["messages"]})
        assert status == 200, answer
        (score,) = answer["data"][0]["data"]
        assert_score(score, row)


def test_a_conversation_without_the_pattern_is_an_error_for_its_request_alone(server, cases):
    """The prompt cut before its assistant header, sent while two scorable conversations are in flight: its request
    is answered with an error (no number), theirs with their scores, and the server goes on."""
    port, model = server
    good, other = cases["armorm"]["rows"][:2]
    cut = good["input_ids"][: good["gating_position"]]
    answers = concurrently(
        port, "/classify", [{"model": model, "input": [ids]} for ids in (good["input_ids"], cut, other["input_ids"])]
    )
    (status, refused) = answers[1]
    assert status == 400 and "error" in refused and "data" not in refused, (status, refused)
    for (status, answer), row in ((answers[0], good), (answers[2], other)):
        assert status == 200, answer
        assert_score(answer["data"][0]["probs"][0], row)
    status, answer = request(port, "/classify", {"model": model, "input": [good["input_ids"]]})
    assert status == 200, answer
    assert_score(answer["data"][0]["probs"][-1], good)


def test_tokens_that_are_not_one_prompt_and_one_answer_are_an_error_for_their_request(server, cases):
    """The rows the transformers model refuses as not one prompt and one answer (a user turn after the answer; an
    answer that writes the assistant header, as token ids or in `messages`, whose special tokens vLLM parses) are
    errors for their own requests; the row between them, in flight at the same time, is scored as the model scores
    it."""
    port, model = server
    raw = {row["name"]: row for row in cases["armorm"]["raw"]}
    names = ("ends-with-a-user-turn", "one-prompt-one-answer", "answer-writes-the-header")
    payloads = [{"model": model, "input": [raw[name]["input_ids"]]} for name in names]
    first, scored, last = concurrently(port, "/classify", payloads)
    for status, refused in (first, last):
        assert status == 400 and "data" not in refused, (status, refused)
    assert scored[0] == 200, scored
    assert_score(scored[1]["data"][0]["probs"][-1], raw["one-prompt-one-answer"])
    status, answer = request(
        port, "/pooling", {"model": model, "messages": raw["answer-writes-the-header"]["messages"]}
    )
    assert status == 400 and "data" not in answer, (status, answer)


def test_pooling_with_data_returns_the_full_vector_while_classify_returns_the_score(server, cases):
    """One server, two layouts: `/pooling` with `{"data": {"input": ...}}` gives [status, s, r_1..k, g_1..k, c_1..k]
    per input, each part the transformers model's; `/classify` on the same inputs gives [s], read as verl reads it."""
    from vllm_armorm import ArmoRMOutput

    port, model = server
    rows = cases["armorm"]["rows"]
    k = len(rows[0]["rewards"])
    status, pooled = request(port, "/pooling", {"model": model, "data": {"input": [r["input_ids"] for r in rows]}})
    assert status == 200, pooled
    status, classified = request(port, "/classify", {"model": model, "input": [r["input_ids"] for r in rows]})
    assert status == 200, classified
    assert [item["index"] for item in pooled["data"]] == list(range(len(rows)))
    for row, item, classified_item in zip(rows, pooled["data"], classified["data"]):
        vector = item["data"]
        assert len(vector) == 2 + 3 * k and vector[0] == 0, vector
        assert_matches(ArmoRMOutput.from_vector(vector, where=row["name"]), row)
        assert classified_item["probs"] == [classified_item["probs"][-1]]  # one value: nothing to take for it
        assert_score(classified_item["probs"][-1], row)

    # One text input, as verl renders it, is one conversation too.
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast.from_pretrained(model)
    row = rows[0]
    text = tokenizer.apply_chat_template(row["messages"], tokenize=False)
    status, pooled = request(port, "/pooling", {"model": model, "data": {"input": text}})
    assert status == 200, pooled
    assert_matches(ArmoRMOutput.from_vector(pooled["data"][0]["data"]), row)


def test_an_unscorable_input_is_an_error_on_pooling_with_data(server, cases):
    """The prompt cut before its assistant header, and raw tokens that are not one prompt and one answer: their
    `/pooling` requests fail with the reason and the input's index, a request in flight beside them is served."""
    port, model = server
    good = cases["armorm"]["rows"][0]
    raw = {row["name"]: row for row in cases["armorm"]["raw"]}
    cut = good["input_ids"][: good["gating_position"]]
    inputs = ([good["input_ids"], cut], [good["input_ids"]], [raw["answer-writes-the-header"]["input_ids"]])
    answers = concurrently(port, "/pooling", [{"model": model, "data": {"input": i}} for i in inputs])
    (status, refused), (good_status, scored), (header_status, header) = answers
    assert status == 400 and "data" not in refused, (status, refused)
    assert "input 1" in refused["error"]["message"] and "gating pattern" in refused["error"]["message"], refused
    assert header_status == 400 and "one prompt and one answer" in header["error"]["message"], header
    assert good_status == 200, scored
    assert_score(scored["data"][0]["data"][1], good)
    status, malformed = request(port, "/pooling", {"model": model, "data": {"messages": good["messages"]}})
    assert status == 400 and '{"input": ...}' in malformed["error"]["message"], (status, malformed)
