"""Integration on the real SmolLM2-135M-Instruct backbone (the GGUF the Makefile installs)."""

import pytest
import torch
from transformers import AutoModel

from modeling_armorm import ArmoRMConfig, ArmoRMForRewardModeling, gating_pattern_from_tokenizer
from tests.utils import SMOLLM2_GGUF, requires_smollm2, smollm2_dir


pytestmark = [pytest.mark.slow, requires_smollm2]

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4."}],
    [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "It is 5, obviously."}],
    [
        {"role": "system", "content": "Answer in French."},
        {"role": "user", "content": "Say hello."},
        {"role": "assistant", "content": "Bonjour !"},
        {"role": "user", "content": "Now say goodbye, politely, in a full sentence."},
        {"role": "assistant", "content": "Au revoir, et merci pour cette conversation très agréable."},
    ],
]


@pytest.fixture(scope="module")
def smollm2_armorm(smollm2_tokenizer_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
    backbone = AutoModel.from_pretrained(smollm2_dir(), gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    config = ArmoRMConfig(
        text_config=backbone.config,
        num_objectives=5,
        gating_hidden_dim=64,
        **gating_pattern_from_tokenizer(tokenizer).config_kwargs(),
    )
    config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(0)
    model = ArmoRMForRewardModeling(config)
    model.model.load_state_dict(backbone.state_dict())
    return model.eval(), tokenizer


def test_real_backbone_scores_finite_reproducible_and_batch_invariant(smollm2_armorm, tmp_path):
    model, tokenizer = smollm2_armorm
    assert tokenizer.pad_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")  # pad = end of turn
    batch = tokenizer.apply_chat_template(CONVERSATIONS, tokenize=True, padding=True, return_tensors="pt")
    with torch.no_grad():
        batched = model(**batch)
        alone = [model(**tokenizer.apply_chat_template(c, tokenize=True, return_tensors="pt")) for c in CONVERSATIONS]
    assert torch.isfinite(batched.score).all() and torch.isfinite(batched.rewards).all()
    torch.testing.assert_close(batched.score, torch.cat([o.score for o in alone]), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(batched.rewards, torch.cat([o.rewards for o in alone]), atol=1e-4, rtol=1e-4)

    model.save_pretrained(tmp_path)
    reloaded = ArmoRMForRewardModeling.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        again = reloaded(**batch)
    torch.testing.assert_close(again.score, batched.score, atol=0, rtol=0)
