"""A saved checkpoint loads with `trust_remote_code=True` where the `modeling_armorm` package cannot be imported."""

import ast
import json
import os
import subprocess
import sys

import torch

from tests.utils import tiny_armorm, tiny_llama_config


# Runs in a fresh interpreter; `sys.modules[...] = None` makes any `import modeling_armorm` fail there.
LOAD_AS_REMOTE_CODE = """
import json, sys
sys.modules["modeling_armorm"] = None
sys.modules["conversion"] = None
import torch
from transformers import AutoModelForSequenceClassification
checkpoint, ids, mask, out = sys.argv[1:5]
model = AutoModelForSequenceClassification.from_pretrained(checkpoint, trust_remote_code=True).eval()
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
with torch.no_grad():
    result = model(input_ids=torch.tensor(json.loads(ids)), attention_mask=torch.tensor(json.loads(mask)))
frozen = "reward_transform_matrix" not in {n for n, p in model.named_parameters() if p.requires_grad}
model.save_pretrained(out)
print(json.dumps({"score": result.score.tolist(), "frozen": frozen}))
"""


def load_as_remote_code(checkpoint, ids, mask, out, tmp_path):
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", LOAD_AS_REMOTE_CODE, str(checkpoint), json.dumps(ids), json.dumps(mask), str(out)],
        capture_output=True, text=True, env=env, cwd=tmp_path, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_remote_code_files_import_only_torch_transformers_and_each_other(tmp_path):
    tiny_armorm(tiny_llama_config(vocab_size=64), gating_token_pattern=[7, 8]).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_armorm.ArmoRMConfig",
        "AutoModel": "modeling_armorm.ArmoRMForRewardModeling",
        "AutoModelForSequenceClassification": "modeling_armorm.ArmoRMForRewardModeling",
    }
    # transformers copies the modeling file's relative imports with it: `heads.py` holds the heads' math.
    for name in ("configuration_armorm.py", "modeling_armorm.py", "heads.py"):
        tree = ast.parse((tmp_path / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots = {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                roots = {"." if node.level else node.module.split(".")[0]}
            else:
                continue
            assert roots <= {"torch", "transformers", "dataclasses", "."}, (name, roots)


def test_remote_code_load_without_the_package_scores_the_same(tmp_path):
    model = tiny_armorm(tiny_llama_config(vocab_size=64, pad_token_id=7), gating_token_pattern=[7, 8, 9])
    model.save_pretrained(tmp_path / "ckpt")
    ids = [[1, 5, 7, 8, 9, 11, 7, 7], [1, 5, 6, 7, 8, 9, 12, 7]]
    mask = [[1, 1, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1, 1, 1]]
    with torch.no_grad():
        expected = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).score
    remote = load_as_remote_code(tmp_path / "ckpt", ids, mask, tmp_path / "resaved", tmp_path)
    torch.testing.assert_close(torch.tensor(remote["score"]), expected, atol=1e-5, rtol=1e-5)
    assert remote["frozen"]
    # The copy re-saved by the remote-code classes is itself a remote-code checkpoint.
    again = load_as_remote_code(tmp_path / "resaved", ids, mask, tmp_path / "resaved2", tmp_path)
    torch.testing.assert_close(torch.tensor(again["score"]), expected, atol=1e-5, rtol=1e-5)
