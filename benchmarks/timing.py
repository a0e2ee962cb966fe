"""Timing pieces the benchmarks share: a bare forward over prepared batches, the time a call spends inside
`model.forward`, the machine's facts for the report, and the work a speed is measured against: the tokens there are to
compute and the backbone's arithmetic per token. On a GPU every reading waits for the queued kernels."""

import functools
import os
import platform
import subprocess
import time
from collections.abc import Callable

import torch

from modeling_armorm.prefix_sharing import prefix_groups, shared_length


def synchronize() -> None:
    """Wait for the queued CUDA kernels, so that a clock reading covers them (nothing to wait for on a CPU)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


@torch.inference_mode()
def bare_forward(model, batches, **forward_kwargs) -> float:
    """Seconds for `model(**batch, **forward_kwargs)` over `batches` and nothing else: the reference a stage's
    throughput is divided by."""
    synchronize()
    start = time.perf_counter()
    for batch in batches:
        model(**batch, **forward_kwargs)
    synchronize()
    return time.perf_counter() - start


def timed_with_forward_share(model, run: Callable[[], object]) -> tuple[float, float, object]:
    """(seconds of `run()`, seconds of it inside `model.forward`, what `run` returned): the in-run share of the
    forward is immune to the machine's noise, which swings both numbers of one run together."""
    return timed_inside(model, "forward", run)


def timed_inside(owner, name: str, run: Callable[[], object]) -> tuple[float, float, object]:
    """(seconds of `run()`, seconds of it inside `owner.name(...)`, what `run` returned), for a method called through
    the instance (`model(...)` calls `model.forward`)."""
    inner, inside = getattr(owner, name), [0.0]

    @functools.wraps(inner)  # keeps the signature, which the scoring path reads (`prefix_sharing`)
    def timed_method(*args, **kwargs):
        synchronize()
        start = time.perf_counter()
        output = inner(*args, **kwargs)
        synchronize()
        inside[0] += time.perf_counter() - start
        return output

    setattr(owner, name, timed_method)  # an instance attribute: `del` restores the class's method
    try:
        synchronize()
        start = time.perf_counter()
        result = run()
        synchronize()
        seconds = time.perf_counter() - start
    finally:
        delattr(owner, name)
    return seconds, inside[0], result


def cpu_model() -> str:
    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines()
        return next(line.split(":", 1)[1].strip() for line in lines if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or "unknown CPU"


def machine_facts(threads: int | None = None) -> str:
    """One line for a report: the CPU (or GPU), cores, torch threads, load average, and the torch, transformers and
    Python versions."""
    import transformers

    if torch.cuda.is_available():
        device = f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda}), host CPU {cpu_model()}"
    else:
        device = cpu_model()
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    return (
        f"{device}, {os.cpu_count()} cores, {threads or torch.get_num_threads()} torch thread(s), load average "
        f"{load} (1, 5, 15 min); torch {torch.__version__}, transformers {transformers.__version__}, Python "
        f"{platform.python_version()}"
    )


def head_width(config) -> int:
    """The query heads' total width (heads x head_dim); the hidden size unless the config sets its own `head_dim`."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return config.num_attention_heads * head_dim


def linear_multiply_adds(config) -> int:
    """Multiply-adds per token and layer in a Llama-shaped decoder's linear layers: q and o, k and v (grouped-query
    heads), and the gated MLP's gate, up and down. Attention's own products depend on the keys and are counted apart."""
    d = config.hidden_size
    kv_width = config.num_key_value_heads * head_width(config) // config.num_attention_heads
    return 2 * d * head_width(config) + 2 * d * kv_width + 3 * d * config.intermediate_size


def unique_token_counts(encoded) -> tuple[int, int, list[int]]:
    """(unique tokens, all tokens, the shared prefix of each group) of encoded conversations: answers to one prompt
    count what they share once (`prefix_sharing.shared_length`: the prompt through its assistant header) and their own
    tokens each; a conversation without another answer to its prompt counts whole."""
    groups = prefix_groups(encoded)
    prefix = [shared_length(encoded, rows) for rows in groups]
    grouped = {row for rows in groups for row in rows}
    whole = sum(len(row) for row in encoded)
    own = sum(len(encoded[row]) - p for p, rows in zip(prefix, groups) for row in rows)
    alone = sum(len(row) for i, row in enumerate(encoded) if i not in grouped)
    return sum(prefix) + own + alone, whole, prefix
