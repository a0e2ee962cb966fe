"""`armorm push` against huggingface_hub's own HTTP layer, answered by an `httpx2.MockTransport`.

huggingface_hub sends every request through the client that `set_client_factory` builds, so the mock sees exactly
what the Hub would: the repo creation, the card's YAML check, the preupload and the commit with every file.
"""

import base64
import json
import os

import httpx2
import pytest
from huggingface_hub import constants
from huggingface_hub.utils import set_client_factory
from huggingface_hub.utils._http import default_client_factory

from armorm_cli import cli
from conversion import push
from conversion.model_card import CardInfo, build_model_card
from tests.utils import HUB_AGENT_REGISTRY, hub_upload_handler, tiny_armorm


REPO_ID = "someone/armorm-tiny"
TOKEN = "hf_test_token"


def api_calls(requests) -> list:
    return [request for request in requests if request.url.path != HUB_AGENT_REGISTRY]


@pytest.fixture
def hub():
    """Every request huggingface_hub makes, answered like the Hub answers an upload of small files."""
    requests = []

    handler = hub_upload_handler(requests, REPO_ID, "model")
    set_client_factory(lambda: httpx2.Client(transport=httpx2.MockTransport(handler)))
    yield requests
    set_client_factory(default_client_factory)


@pytest.fixture
def no_login(monkeypatch, tmp_path):
    """No token anywhere: no environment variable, no cached login."""
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))


def write_checkpoint(folder, model_id: str = REPO_ID) -> None:
    """What `armorm assemble` writes, minus the tokenizer: weights, config with auto_map, remote code, card."""
    model = tiny_armorm(num_objectives=3, objective_names=["a", "b", "c"], verbosity_objective=2)
    model.save_pretrained(folder)
    info = CardInfo(
        objectives=["a", "b", "c"],
        alphas=[1.0, 10.0, 100.0],
        penalties=[0.5, 0.25, 0.0],
        verbosity_objective=2,
        hidden_size=16,
        gating_hidden_dim=12,
        gating_n_hidden=3,
        gating_temperature=10.0,
        logit_scale=3.0,
        gating_pattern_text=None,
        model_id=model_id,
        build=[{"stage": "assemble", "command": "armorm assemble ...", "settings": {}}],
        base_model="HuggingFaceTB/SmolLM2-135M-Instruct",
    )
    build_model_card(info).save(os.path.join(folder, "README.md"))


@pytest.fixture
def checkpoint(tmp_path):
    folder = tmp_path / "ckpt"
    write_checkpoint(folder)
    return folder


def local_files(folder) -> dict[str, bytes]:
    return {
        os.path.relpath(os.path.join(root, name), folder): open(os.path.join(root, name), "rb").read()
        for root, _, names in os.walk(folder)
        for name in names
    }


def test_push_creates_the_repo_and_commits_every_file(checkpoint, hub, capsys):
    info = push.main(
        checkpoint=str(checkpoint), repo_id=REPO_ID, private=True, token=TOKEN, commit_message="First upload"
    )
    hub = api_calls(hub)
    assert info.oid == "0123456789abcdef0123456789abcdef01234567"
    assert all(request.headers["authorization"] == f"Bearer {TOKEN}" for request in hub)
    paths = [request.url.path for request in hub]
    assert paths[0] == "/api/repos/create" and paths[-1] == f"/api/models/{REPO_ID}/commit/main"
    assert f"/api/models/{REPO_ID}/preupload/main" in paths and "/api/validate-yaml" in paths

    create = json.loads(hub[0].content)
    assert (create["name"], create["organization"], create["type"]) == ("armorm-tiny", "someone", "model")
    assert create.get("visibility") == "private" or create.get("private") is True

    expected = local_files(checkpoint)
    preupload = json.loads(next(r for r in hub if "/preupload/" in r.url.path).content)
    assert {f["path"]: f["size"] for f in preupload["files"]} == {path: len(data) for path, data in expected.items()}

    lines = [json.loads(line) for line in hub[-1].content.decode().splitlines()]
    assert lines[0]["key"] == "header" and lines[0]["value"]["summary"] == "First upload"
    committed = {line["value"]["path"]: base64.b64decode(line["value"]["content"]) for line in lines[1:]}
    assert committed == expected
    assert {"config.json", "model.safetensors", "configuration_armorm.py", "modeling_armorm.py", "README.md"} <= set(
        committed
    )
    assert info.commit_url in capsys.readouterr().out


def test_token_comes_from_hf_token(checkpoint, hub, no_login, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_from_environment")
    push.main(checkpoint=str(checkpoint), repo_id=REPO_ID)
    hub = api_calls(hub)
    assert hub and all(request.headers["authorization"] == "Bearer hf_from_environment" for request in hub)


def test_no_token_is_refused_before_any_request(checkpoint, hub, no_login):
    with pytest.raises(ValueError, match="No Hub token: pass `--token`, set `HF_TOKEN`"):
        push.main(checkpoint=str(checkpoint), repo_id=REPO_ID)
    assert hub == []


def test_dry_run_lists_files_and_sizes_and_sends_nothing(checkpoint, hub, capsys):
    cli.main(["push", "--checkpoint", str(checkpoint), "--repo-id", REPO_ID, "--dry-run", "--token", TOKEN])
    assert hub == []
    out = capsys.readouterr().out
    expected = {path: len(data) for path, data in local_files(checkpoint).items()}
    assert dict(push.main(checkpoint=str(checkpoint), repo_id=REPO_ID, dry_run=True, token=TOKEN)) == expected
    assert hub == []
    for path in expected:
        assert path in out
    assert "nothing was pushed" in out and f"{len(expected)} files" in out


def test_dry_run_skips_git_folders(checkpoint, hub):
    (checkpoint / ".git").mkdir()
    (checkpoint / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    files = push.main(checkpoint=str(checkpoint), repo_id=REPO_ID, dry_run=True)
    assert all(not path.startswith(".git") for path, _ in files) and hub == []


def _remove(name):
    def edit(folder):
        os.remove(folder / name)

    return edit


def _retype(folder):
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))


def _bad_card(folder):
    text = (folder / "README.md").read_text().replace("library_name: transformers", "library_name: timm")
    (folder / "README.md").write_text(text)


@pytest.mark.parametrize(
    "edit, message",
    [
        (_remove("config.json"), "it has no config.json"),
        (_retype, "model_type 'llama', not 'armorm'"),
        (_remove("model.safetensors"), "holds no weights"),
        (_remove("modeling_armorm.py"), r"lacks the remote-code files \['modeling_armorm.py'\]"),
        (_remove("heads.py"), r"lacks the remote-code files \['heads.py'\]"),  # imported by modeling_armorm.py
        (_remove("README.md"), r"has no model card \(README.md\)"),
        (_bad_card, "`library_name` is 'timm', not 'transformers'"),
    ],
    ids=["no-config", "not-armorm", "no-weights", "no-remote-code", "no-heads-code", "no-card", "bad-card"],
)
@pytest.mark.parametrize("dry_run", [True, False])
def test_a_folder_that_is_not_an_armorm_checkpoint_is_refused(checkpoint, hub, edit, message, dry_run):
    edit(checkpoint)
    with pytest.raises(ValueError, match=message):
        push.main(checkpoint=str(checkpoint), repo_id=REPO_ID, dry_run=dry_run, token=TOKEN)
    assert hub == []


def test_a_card_that_loads_another_model_is_flagged(tmp_path, hub, caplog):
    write_checkpoint(tmp_path / "ckpt", model_id="somebody-else/model")
    push.main(checkpoint=str(tmp_path / "ckpt"), repo_id=REPO_ID, dry_run=True)
    assert f"does not load '{REPO_ID}'" in caplog.text and hub == []
