"""Packed batches: every output equals the conversation run alone, no padding is computed, and the backbone's attention
implementation is back as it was after a packed forward, also for ordinary forwards made meanwhile."""

import random
import threading

import pytest
import torch
from transformers import BertConfig, BertModel

from modeling_armorm import packing, prefix_sharing
from modeling_armorm.batching import CPU_MAX_BATCH_TOKENS, CPU_MAX_PACKED_TOKENS
from modeling_armorm.scoring import EncodedConversation, conversation_features, score_encoded, scoring_steps
from tests.serving_utils import sensitive_gating
from tests.utils import (
    BackboneForwards,
    assert_features_match_alone,
    padded,
    reference_armorm_outputs,
    tiny_armorm,
    tiny_llama_config,
)


PATTERN = [5, 6]
FIELDS = ("score", "rewards", "gating_output", "coefficients")


def armorm(attn_implementation: str = "sdpa", **text_overrides):
    model = tiny_armorm(text_config=tiny_llama_config(**text_overrides), gating_token_pattern=PATTERN)
    model.model.config._attn_implementation = attn_implementation
    sensitive_gating(model, seed=0)
    return model


def rows_of(lengths, seed: int = 0) -> list[EncodedConversation]:
    """Conversations of (prompt tokens before the gating pattern, answer tokens), every prompt its own."""
    rng = random.Random(seed)
    rows = []
    for prompt_length, answer_length in lengths:
        prompt = [rng.randrange(10, 128) for _ in range(prompt_length)] + PATTERN
        answer = [rng.randrange(10, 128) for _ in range(answer_length)]
        rows.append(EncodedConversation(prompt + answer, prompt_length, prompt_length + 2))
    return rows


LENGTHS = [(30, 12), (0, 1), (4, 40), (17, 3), (9, 0), (60, 25)]  # a prompt of the gate alone; an answer of none


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("heads", [(2, 1), (4, 4)])  # grouped-query and plain multi-head attention
@pytest.mark.parametrize("batch_size", [1, 4, 16])
def test_packed_equals_each_conversation_alone(attn_implementation, heads, batch_size):
    model = armorm(attn_implementation, num_attention_heads=heads[0], num_key_value_heads=heads[1])
    rows = rows_of(LENGTHS)
    out = score_encoded(model, rows, batch_size=batch_size, share_prefix=False, pack=True)
    expected = reference_armorm_outputs(model, [row.input_ids for row in rows], PATTERN)
    for key in FIELDS:
        torch.testing.assert_close(getattr(out, key), expected[key], rtol=1e-5, atol=1e-5, msg=key)


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("pack", [True, False])
@pytest.mark.parametrize("batch_size, max_batch_tokens", [(1, None), (4, None), (16, 64)])
def test_features_equal_each_conversation_alone(attn_implementation, pack, batch_size, max_batch_tokens):
    """What `armorm extract` writes and the BT stage scores (`conversation_features`, a bare backbone): h at the last
    token and h_x at the first token of the last gating pattern, packed or padded, equal to each conversation's own
    unpadded forward."""
    backbone = armorm(attn_implementation, num_attention_heads=2, num_key_value_heads=1).model
    rows = rows_of(LENGTHS * 2, seed=3)
    with BackboneForwards(backbone) as forwards:
        h, h_x = conversation_features(backbone, rows, batch_size, 0, max_batch_tokens=max_batch_tokens, pack=pack)
    assert len(forwards) >= len(rows) / batch_size and not forwards.over(max_batch_tokens or 10**9)
    assert_features_match_alone(backbone, rows, h, h_x, PATTERN)


def test_features_pack_on_a_cpu_where_the_backbone_allows_it():
    rows = rows_of(LENGTHS)
    for backbone, packs in [(armorm().model, True), (armorm(sliding_window=8).model, False)]:
        seen = []
        backbone.register_forward_pre_hook(
            lambda module, args, kwargs, seen=seen: seen.append("armorm_packing" in kwargs), with_kwargs=True
        )
        assert packing.backbone_supports_packing(backbone) is packs
        conversation_features(backbone, rows, 4, 0)
        assert set(seen) == {packs}
    with pytest.raises(ValueError, match="cannot run packed"):
        conversation_features(armorm(sliding_window=8).model, rows, 4, 0, pack=True)
    empty = conversation_features(armorm().model, [], 4, 0)
    assert [tuple(t.shape) for t in empty] == [(0, armorm().config.get_text_config().hidden_size)] * 2


def test_a_bidirectional_encoder_is_never_packed_or_shared():
    """In BERT every token sees the later ones, so neither a packed row (causal per conversation) nor a prompt run
    once gives its features: they run whole, padded, and equal each conversation's own bidirectional forward."""
    config = BertConfig(
        vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    )
    torch.manual_seed(0)
    bert = BertModel(config, add_pooling_layer=False).eval()
    assert bert._supports_attention_backend, "the check must not rest on the attention backend alone"
    assert not packing.backbone_supports_packing(bert) and not prefix_sharing.backbone_supports_prefix_sharing(bert)
    rows = rows_of(LENGTHS)
    rows += [EncodedConversation(rows[0].input_ids[:32] + [40, 41, 42], 30, 32)]  # shares the first row's prompt
    with pytest.raises(ValueError, match="cannot run packed"):
        conversation_features(bert, rows, 4, 0, pack=True)
    h, h_x = conversation_features(bert, rows, 4, 0)
    assert_features_match_alone(bert, rows, h, h_x, PATTERN)


def test_a_packed_batch_is_one_row_of_real_tokens():
    model = armorm()
    rows = rows_of(LENGTHS)
    shapes = []
    model.model.register_forward_pre_hook(
        lambda module, args, kwargs: shapes.append(kwargs["input_ids"].shape), with_kwargs=True
    )
    score_encoded(model, rows, batch_size=16, share_prefix=False, pack=True, max_batch_tokens=10**6)
    assert shapes == [torch.Size([1, sum(len(row) for row in rows)])]
    shapes.clear()
    score_encoded(model, rows, batch_size=16, share_prefix=False, pack=False, max_batch_tokens=10**6)
    assert shapes == [torch.Size([len(rows), max(len(row) for row in rows)])]


def test_on_a_cpu_scoring_packs_where_the_backbone_allows_it():
    rows = rows_of(LENGTHS)
    for model, packs in [(armorm(), True), (armorm(sliding_window=8), False), (armorm("flex_attention"), False)]:
        seen = []
        model.model.register_forward_pre_hook(
            lambda module, args, kwargs, seen=seen: seen.append("armorm_packing" in kwargs), with_kwargs=True
        )
        assert packing.supports_packing(model) is packs
        score_encoded(model, rows, batch_size=4, share_prefix=False)
        assert set(seen) == {packs}
    with pytest.raises(ValueError, match="cannot run packed"):
        score_encoded(armorm(sliding_window=8), rows, batch_size=4, pack=True)


def test_soft_capped_attention_is_never_packed():
    model = armorm()
    model.model.config.attn_logit_softcapping = 50.0
    assert not packing.supports_packing(model)
    layout = packing.PackedLayout([(0, 3)])
    q = torch.randn(1, 2, 3, 4)
    with pytest.raises(NotImplementedError, match="softcap"):
        packing.packed_sdpa(model.model.layers[0].self_attn, q, q, q, None, armorm_packing=layout, softcap=50.0)


def test_an_ordinary_forward_during_a_packed_one_keeps_its_mask():
    """While the switch is on (another thread packing), a padded forward of the same model gets plain SDPA with its
    padding mask: the same outputs as with the switch off."""
    model = armorm()
    rows = [row.input_ids for row in rows_of(LENGTHS)]
    input_ids, attention_mask = padded(rows, 0, "right")
    with torch.no_grad():
        before = model(input_ids=input_ids, attention_mask=attention_mask)
        with packing.packed_attention(model.model):
            assert model.model.config._attn_implementation == packing.PACKED_ATTENTION
            during = model(input_ids=input_ids, attention_mask=attention_mask)
    for key in FIELDS:
        torch.testing.assert_close(getattr(during, key), getattr(before, key), rtol=1e-5, atol=1e-6, msg=key)


def test_the_attention_implementation_comes_back_after_the_last_packed_forward():
    model = armorm("eager")
    config = model.model.config
    with packing.packed_attention(model.model):
        with packing.packed_attention(model.model):  # another thread's packed forward overlapping
            pass
        assert config._attn_implementation == packing.PACKED_ATTENTION
    assert config._attn_implementation == "eager"
    with pytest.raises(RuntimeError, match="inside"):
        with packing.packed_attention(model.model):
            raise RuntimeError("a failure inside a packed forward")
    assert config._attn_implementation == "eager"


def test_threads_packing_one_model_at_once_get_each_conversation_alone():
    model = armorm()
    rows = rows_of(LENGTHS * 3, seed=1)
    expected = reference_armorm_outputs(model, [row.input_ids for row in rows], PATTERN)["score"]
    results, errors = {}, []

    def score(thread: int):
        try:
            for _ in range(5):
                results.setdefault(thread, []).append(score_encoded(model, rows, batch_size=3, pack=True).score)
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=score, args=(t,)) for t in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    for scores in results.values():
        for score in scores:
            torch.testing.assert_close(score, expected, rtol=1e-5, atol=1e-5)
    assert model.model.config._attn_implementation == "sdpa"


def test_the_default_budget_follows_the_layout():
    """No budget given on a CPU: packed batches hold up to `CPU_MAX_PACKED_TOKENS` (rows × the longest), padded ones
    `CPU_MAX_BATCH_TOKENS`; `scoring_steps` plans the same batches as the run."""
    model = armorm()
    rows = rows_of([(20 + 10 * i, 150 + 20 * i) for i in range(12)], seed=2)
    for pack, budget in [(True, CPU_MAX_PACKED_TOKENS), (False, CPU_MAX_BATCH_TOKENS)]:
        with BackboneForwards(model.model) as forwards:
            score_encoded(model, rows, batch_size=16, share_prefix=False, pack=pack)
        assert not forwards.over(budget) and max(r * c for r, c in forwards) > budget // 2, pack
        steps = scoring_steps(model, rows, batch_size=16, share_prefix=False, pack=pack)
        assert [len(step) for step in steps] == [r for r, _ in forwards], pack
