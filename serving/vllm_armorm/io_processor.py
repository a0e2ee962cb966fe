# Copyright 2026 The armorm developers. Licensed under the Apache License, Version 2.0.
"""The full vector over vLLM's HTTP `/pooling`: an IO-processor plugin (entry point `vllm.io_processor_plugins`:
`armorm`).

vLLM 0.32 builds the same `PoolingParams` for `/classify` and for a plain `/pooling` request (both run the server's one
pooling task, "classify", and neither request can carry `extra_kwargs`), so both return the reward [s]. The one
request the server lets a plugin shape is a `/pooling` request with a `data` field, which vLLM hands to the
IO processor named by `--io-processor-plugin`. Started with `--io-processor-plugin armorm`, the server answers

    POST /pooling {"model": ..., "data": {"input": <what /classify takes as input>}}

with one full vector [status, s, r, g, c] per input (`vllm_armorm.outputs`), asked of the same pooler through the
same "classify" task (`FULL_OUTPUT_KEY`); `/classify` and a plain `/pooling` request still return [s]. An input that
cannot be scored fails its HTTP request (400) with the reason and the input's index, as it fails on `/classify`.
"""

from collections.abc import Sequence

from vllm.outputs import PoolingRequestOutput
from vllm.plugins.io_processors.interface import IOProcessor

from .outputs import ArmoRMOutput, pooling_params


__all__ = ["ArmoRMIOProcessor"]

INPUT_HELP = (
    'give `data` as {"input": ...}, where input is what `/classify` takes: a text, a list of token ids, or a list '
    "of either (one conversation each, rendered with the reward model's chat template, ending with the answer; a text "
    "is tokenized as it is, without adding special tokens)"
)


def _is_token_ids(value) -> bool:
    return isinstance(value, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in value)


class ArmoRMIOProcessor(IOProcessor[list, list[dict]]):
    """`data` {"input": text | token ids | list of either} -> one prompt per conversation -> the pooler's full vector
    per conversation, as [{"index": i, "data": [status, s, r_1 … r_k, g_1 … g_k, c_1 … c_k]}, ...]."""

    def __init__(self, vllm_config, renderer):
        super().__init__(vllm_config, renderer)
        self.renderer = renderer

    def parse_data(self, data: object) -> list:
        if not isinstance(data, dict) or set(data) != {"input"}:
            raise ValueError(f"The ArmoRM `/pooling` plugin got `data` = {str(data)[:200]}: {INPUT_HELP}.")
        given = data["input"]
        if isinstance(given, str) or (_is_token_ids(given) and given):
            return [given]
        if isinstance(given, list) and given and all(isinstance(x, str) or _is_token_ids(x) for x in given):
            return given
        raise ValueError(f"The ArmoRM `/pooling` plugin got `data.input` = {str(given)[:200]}: {INPUT_HELP}.")

    def pre_process(self, prompt: list, request_id: str | None = None, **kwargs) -> list:
        # A text is the conversation rendered with the chat template, which writes the BOS itself: tokenized as it is
        # (vLLM would add a second BOS to a text prompt, and move every position by one).
        tokenizer = self.renderer.get_tokenizer() if any(isinstance(x, str) for x in prompt) else None
        return [
            {"prompt_token_ids": tokenizer.encode(x, add_special_tokens=False) if isinstance(x, str) else list(x)}
            for x in prompt
        ]

    def merge_pooling_params(self, params=None):
        # The server's own task, run as `/classify` runs it (prefix cache included), asking for the full vector.
        return pooling_params(full_output=True)

    def post_process(self, model_output: Sequence[PoolingRequestOutput], request_id: str | None = None, **kwargs):
        items = []
        for index, output in enumerate(model_output):
            vector = output.outputs.data.tolist()
            ArmoRMOutput.from_vector(vector, where=f"input {index}")  # raises for an input the pooler refused
            items.append({"index": index, "data": vector})
        return items
