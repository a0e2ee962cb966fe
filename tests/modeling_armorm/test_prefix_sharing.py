"""Shared-prefix scoring: answers to one prompt run the prompt once, and every output equals the conversation run alone."""

import os
import random

import pytest
import torch

from modeling_armorm import prefix_sharing
from modeling_armorm.scoring import EncodedConversation, conversation_features, score_encoded, scoring_steps
from tests.serving_utils import sensitive_gating
from tests.utils import assert_features_match_alone, reference_armorm_outputs, tiny_armorm, tiny_llama_config


PATTERN = [5, 6]
FIELDS = ("score", "rewards", "gating_output", "coefficients")


def armorm(**config_kwargs):
    """A tiny ArmoRM whose gating depends strongly on h_x, so an h_x read at the wrong token shows."""
    model = tiny_armorm(gating_token_pattern=PATTERN, **config_kwargs)
    sensitive_gating(model, seed=0)
    return model


def conversations(seed: int, shapes) -> list[EncodedConversation]:
    """Rows for `shapes` = [(prompt tokens before the gating pattern, [answer lengths])], shuffled."""
    rng = random.Random(seed)
    rows = []
    for prompt_length, answers in shapes:
        prompt = [rng.randrange(10, 128) for _ in range(prompt_length)] + PATTERN
        for length in answers:
            rows.append(
                EncodedConversation(
                    prompt + [rng.randrange(10, 128) for _ in range(length)], len(prompt) - 2, len(prompt)
                )
            )
    rng.shuffle(rows)
    return rows


def assert_matches_alone(out, model, rows):
    """Every output equals the conversation run alone, written out row by row in `reference_armorm_outputs`."""
    expected = reference_armorm_outputs(model, [row.input_ids for row in rows], PATTERN)
    for key in FIELDS:
        torch.testing.assert_close(getattr(out, key), expected[key], rtol=1e-5, atol=1e-5, msg=key)


class BackboneTokens:
    """Counts the real tokens the backbone computes (prefix runs and answer runs)."""

    def __init__(self, model):
        """`model`: an ArmoRM, or a bare backbone."""
        self.tokens = 0
        self.handle = getattr(model, "model", model).register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs):
        mask, input_ids = kwargs["attention_mask"], kwargs["input_ids"]
        # A packed forward's row holds real tokens only.
        packed = "armorm_packing" in kwargs
        self.tokens += input_ids.numel() if packed else int(mask[:, -input_ids.shape[1] :].sum())


SHAPES = [
    [(20, [5, 1, 9]), (7, [3, 12]), (33, [4]), (0, [2, 2, 6])],  # groups of 3, 2, 1; a prompt of one token (the gate)
    [(3, [1] * 9), (40, [30, 1])],  # a group larger than the batch; answers of one token
    [(12, [4]), (9, [7]), (30, [2])],  # no shared prompt at all
]


@pytest.mark.parametrize("shapes", SHAPES)
@pytest.mark.parametrize("batch_size", [1, 3, 16])
@pytest.mark.parametrize("length_objective", [None, 1])
@pytest.mark.parametrize("pack", [True, False])
def test_shared_prefix_equals_each_conversation_alone(shapes, batch_size, length_objective, pack):
    model = armorm(length_objective=length_objective)
    for seed, max_batch_tokens in [(0, None), (1, 64)]:  # two batch orders; batches by rows, then by a token budget
        rows = conversations(seed, shapes)
        out = score_encoded(model, rows, batch_size=batch_size, max_batch_tokens=max_batch_tokens, pack=pack)
        assert_matches_alone(out, model, rows)


@pytest.mark.parametrize("pack", [True, False])
def test_a_shared_prompt_is_computed_once(pack):
    model = armorm()
    rows = conversations(0, [(40, [3, 5, 7, 2]), (25, [4, 4]), (10, [6])])
    counter = BackboneTokens(model)
    out = score_encoded(model, rows, batch_size=4, pack=pack)
    # Each prompt's tokens, the whole gating pattern included, once (42, 27); then each answer's own tokens; the lone
    # row whole.
    expected = (42 + 27) + (3 + 5 + 7 + 2) + (4 + 4) + (12 + 6)
    assert counter.tokens == expected
    counter.tokens = 0
    alone = score_encoded(model, rows, batch_size=4, share_prefix=False, pack=pack)
    assert counter.tokens == sum(len(row) for row in rows)
    for key in FIELDS:
        torch.testing.assert_close(getattr(out, key), getattr(alone, key), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shapes", SHAPES[:2])
@pytest.mark.parametrize("pack", [True, False])
def test_shared_features_equal_each_conversation_alone(shapes, pack):
    """What `armorm extract` writes for responses (or pair sides) that share a prompt (`conversation_features`, a bare
    backbone): each prompt runs once, and h at the last token and h_x at the gating pattern equal each conversation's
    own unpadded forward."""
    backbone = armorm().model
    rows = conversations(2, shapes)
    counter = BackboneTokens(backbone)
    h, h_x = conversation_features(backbone, rows, 3, 0, max_batch_tokens=64, pack=pack)
    counter.handle.remove()
    assert counter.tokens == tokens_run_once(rows)
    assert_features_match_alone(backbone, rows, h, h_x, PATTERN)


def tokens_run_once(rows) -> int:
    """The tokens a shared forward computes, counted row by row: rows with the same tokens up to the gating position run
    what they all have in common once (short of each one's last token), then each its own rest; a lone row whole."""
    by_prompt: dict[tuple, list] = {}
    for row in rows:
        by_prompt.setdefault(tuple(row.input_ids[: row.gating_position + 1]), []).append(row.input_ids)
    total = 0
    for group in by_prompt.values():
        if len(group) == 1:
            total += len(group[0])
            continue
        common = min(len(os.path.commonprefix(group)), min(map(len, group)) - 1)
        total += common + sum(len(ids) - common for ids in group)
    return total


@pytest.mark.parametrize("pack", [True, False])
def test_tokens_every_answer_has_after_the_gate_run_once(pack):
    """The rest of the gating pattern and an opening every answer has run with the prompt, once; h_x is still read at
    the gating position. Identical answers, and an answer that is the start of another, each still run their last
    token."""
    model = armorm()
    rng = random.Random(3)
    prompt = [rng.randrange(10, 128) for _ in range(15)] + PATTERN
    opening = [50, 51, 52]
    answers = [opening + [60, 61], opening + [70], opening + [60, 61, 62, 63], opening + [80, 81, 82]]
    rows = [EncodedConversation(prompt + answer, len(prompt) - 2, len(prompt)) for answer in answers]
    rows += [rows[0], EncodedConversation(prompt + opening[:2], len(prompt) - 2, len(prompt))]  # a twin; a short one
    rows += [EncodedConversation(list(row.input_ids), row.gating_position, row.answer_start) for row in rows[:2]]
    other = [7, 8] + PATTERN  # a second prompt whose two answers are the same
    rows += [EncodedConversation(other + [90, 91, 92], 2, 4)] * 2
    assert prefix_sharing.shared_length(rows, [0, 1, 2, 3]) == len(prompt) + 3
    assert prefix_sharing.shared_length(rows, [0, 1, 2, 3, 4, 5]) == len(prompt) + 1  # short of the short one's end
    assert prefix_sharing.shared_length(rows, [8, 9]) == 6  # short of the twins' last token
    counter = BackboneTokens(model)
    out = score_encoded(model, rows, batch_size=3, pack=pack)
    counter.handle.remove()
    assert counter.tokens == tokens_run_once(rows)
    assert_matches_alone(out, model, rows)


def test_grouping_comes_from_the_token_ids():
    """Rows that share the prompt's text but not its tokens up to the gating position are not grouped; rows whose
    gating positions differ are not grouped although one prompt is the other's prefix."""
    base = [11, 12, 13] + PATTERN
    rows = [
        EncodedConversation(base + [20, 21], 3, 5),
        EncodedConversation([11, 12, 14] + PATTERN + [20, 21], 3, 5),  # one token differs before the gate
        EncodedConversation(base + [20, 21], 3, 5),
        EncodedConversation(base + PATTERN + [30], 5, 7),  # its gate is later: its prefix holds the first answer's
    ]
    assert prefix_sharing.prefix_groups(rows) == [[0, 2]]
    model = armorm()
    assert_matches_alone(score_encoded(model, rows, batch_size=2), model, rows)


def test_scoring_steps_run_again_give_the_same_numbers():
    """`score_encoded` on one step's rows runs that step again: a process group splitting the steps gets the numbers
    one process gets, bit for bit."""
    model = armorm()
    rows = conversations(1, SHAPES[0] + SHAPES[2])
    whole = score_encoded(model, rows, batch_size=3)
    steps = scoring_steps(model, rows, batch_size=3)
    assert sorted(i for step in steps for i in step) == list(range(len(rows)))
    for step in steps:
        part = score_encoded(model, [rows[i] for i in step], batch_size=3)
        for key in FIELDS:
            assert torch.equal(getattr(part, key), getattr(whole, key)[step]), key


def test_a_sliding_window_backbone_runs_each_conversation_whole():
    """A sliding window counts positions in the padded cache: such a backbone is never shared, and is still exact."""
    model = armorm(text_config=tiny_llama_config())
    model.config.get_text_config().sliding_window = 8
    assert not prefix_sharing.supports_prefix_sharing(model)
    rows = conversations(0, SHAPES[0])
    counter = BackboneTokens(model)
    score_encoded(model, rows, batch_size=4)
    assert counter.tokens == sum(len(row) for row in rows)


def test_a_wrapper_on_the_backbone_keeps_sharing():
    """A profiler or hook that replaces the backbone's `forward` on the instance hides its signature; sharing is read
    from the class, so it stays on."""
    model = armorm()
    inner = model.model.forward
    model.model.forward = lambda *args, **kwargs: inner(*args, **kwargs)
    assert prefix_sharing.supports_prefix_sharing(model)
    rows = conversations(0, SHAPES[0])
    expected = reference_armorm_outputs(model, [row.input_ids for row in rows], PATTERN)
    counter = BackboneTokens(model)
    out = score_encoded(model, rows, batch_size=4)
    assert counter.tokens < sum(len(row) for row in rows)
    torch.testing.assert_close(out.score, expected["score"], rtol=1e-5, atol=1e-5)
