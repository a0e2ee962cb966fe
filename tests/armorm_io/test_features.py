"""Features folders and head files (docs/building.md): round trips, row order, other tools' folders, corruption."""

import json

import pytest
import torch
from safetensors.torch import save_file

from armorm_io.artifacts import (
    load_gating,
    load_regression,
    load_transform,
    save_gating,
    save_regression,
    save_transform,
)
from armorm_io.features import (
    SHARD_NAME,
    file_sha256,
    iter_shards,
    load_features,
    load_pair_features,
    read_meta,
    save_meta,
    save_shard,
    shard_names,
    write_features,
)
from modeling_armorm.modeling_armorm import ArmoRMGatingNetwork


def ratings(n=23, d=5, k=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.rand(n, k, generator=generator)
    labels[torch.rand(n, k, generator=generator) < 0.3] = float("nan")
    return {"embeddings": torch.randn(n, d, generator=generator), "labels": labels}


def test_ratings_round_trip_over_several_shards(tmp_path):
    tensors = ratings()
    write_features(tmp_path, "ratings", tensors, objectives=["a", "b", "c"], shard_rows=5, backbone="tiny")
    loaded, meta = load_features(tmp_path)

    assert len(meta["shards"]) == 5 and shard_names(tmp_path) == meta["shards"]
    assert meta["kind"] == "ratings" and meta["hidden_size"] == 5 and meta["backbone"] == "tiny"
    assert meta["objectives"] == ["a", "b", "c"]
    assert meta["counts"]["rows"] == 23
    assert meta["counts"]["labels"] == {
        name: int((~tensors["labels"][:, j].isnan()).sum()) for j, name in enumerate("abc")
    }
    assert set(meta["checksums"]) == set(meta["shards"])
    torch.testing.assert_close(loaded["embeddings"], tensors["embeddings"])
    torch.testing.assert_close(loaded["labels"], tensors["labels"], equal_nan=True)
    assert loaded["index"].tolist() == list(range(23))
    assert not list(tmp_path.glob("*.tmp")), "atomic writes leave no temporary file behind"


def test_pairs_round_trip_and_shape_checks(tmp_path):
    embeddings, prompts = torch.randn(7, 2, 4), torch.randn(7, 4)
    write_features(tmp_path, "pairs", {"embeddings": embeddings, "prompt_embeddings": prompts}, shard_rows=3)
    loaded, meta = load_features(tmp_path)
    assert meta["kind"] == "pairs" and meta["hidden_size"] == 4
    torch.testing.assert_close(loaded["embeddings"], embeddings)
    torch.testing.assert_close(loaded["prompt_embeddings"], prompts)
    with pytest.raises(ValueError, match="prompt_embeddings"):
        write_features(tmp_path / "bad", "pairs", {"embeddings": embeddings})
    with pytest.raises(ValueError, match="objectives"):
        write_features(tmp_path / "bad", "ratings", ratings(k=3), objectives=["only", "two"])


def test_rows_come_back_in_index_order_across_ranks(tmp_path):
    """Two ranks each write every other source row, out of order; the reader restores the source order."""
    tensors = ratings(n=12)
    permutation = torch.randperm(12, generator=torch.Generator().manual_seed(1))
    names = []
    for rank in range(2):
        rows = permutation[rank::2]
        for part, chunk in enumerate(rows.split(4)):
            name = SHARD_NAME.format(rank=rank, index=part)
            save_shard(
                tmp_path,
                name,
                {"embeddings": tensors["embeddings"][chunk], "labels": tensors["labels"][chunk], "index": chunk},
            )
            names.append(name)
    save_meta(tmp_path, {"kind": "ratings", "hidden_size": 5, "objectives": ["a", "b", "c"], "shards": names})

    loaded, _ = load_features(tmp_path)
    assert loaded["index"].tolist() == list(range(12))
    for row in range(12):  # each row is still the source row with that index
        torch.testing.assert_close(loaded["embeddings"][row], tensors["embeddings"][row])
        torch.testing.assert_close(loaded["labels"][row], tensors["labels"][row], equal_nan=True)


def test_duplicate_index_is_an_error(tmp_path):
    tensors = ratings(n=4)
    for part in range(2):
        save_shard(tmp_path, SHARD_NAME.format(rank=part, index=0), {**tensors, "index": torch.arange(4)})
    save_meta(tmp_path, {"kind": "ratings", "hidden_size": 5})
    with pytest.raises(ValueError, match="source row 0 appears in more than one shard"):
        load_features(tmp_path)


def test_meta_without_shards_reads_every_shard_in_name_order(tmp_path):
    """A folder written by another tool: no `shards`, no `checksums`; the reader takes `*.safetensors` by name."""
    tensors = ratings(n=9)
    for part, start in [(2, 6), (0, 0), (1, 3)]:  # written out of order on purpose
        save_file(
            {key: value[start : start + 3] for key, value in tensors.items()},
            str(tmp_path / f"part-{part}.safetensors"),
        )
    (tmp_path / "meta.json").write_text(
        json.dumps({"kind": "ratings", "hidden_size": 5, "objectives": ["a", "b", "c"]})
    )

    assert shard_names(tmp_path) == ["part-0.safetensors", "part-1.safetensors", "part-2.safetensors"]
    loaded, meta = load_features(tmp_path)
    assert "index" not in loaded and meta["objectives"] == ["a", "b", "c"]
    torch.testing.assert_close(loaded["embeddings"], tensors["embeddings"])


def test_checksum_mismatch_is_detected_and_absent_checksums_are_trusted(tmp_path):
    write_features(tmp_path, "ratings", ratings(n=6), shard_rows=3)
    meta = read_meta(tmp_path)
    victim = tmp_path / meta["shards"][1]
    save_file({"embeddings": torch.zeros(3, 5), "labels": torch.zeros(3, 3), "index": torch.arange(3, 6)}, str(victim))

    with pytest.raises(ValueError, match=f"{meta['shards'][1]}.*corrupt"):
        load_features(tmp_path)
    meta.pop("checksums")
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    loaded, _ = load_features(tmp_path)
    assert loaded["embeddings"][3:].abs().sum() == 0


def test_save_meta_adds_missing_checksums_without_touching_the_callers_dict(tmp_path):
    name = SHARD_NAME.format(rank=0, index=0)
    digest = save_shard(tmp_path, name, ratings(n=3))
    meta = {"kind": "ratings", "hidden_size": 5, "shards": [name]}
    save_meta(tmp_path, meta)
    assert "checksums" not in meta
    assert read_meta(tmp_path)["checksums"] == {name: digest} and digest == file_sha256(tmp_path / name)


def test_iter_shards_reads_only_the_keys_asked(tmp_path):
    tensors = ratings(n=6)
    write_features(tmp_path, "ratings", tensors, shard_rows=4)
    shards = list(iter_shards(tmp_path, keys=["labels", "index", "not-there"]))
    assert [sorted(shard) for shard in shards] == [["index", "labels"]] * 2
    torch.testing.assert_close(torch.cat([s["labels"] for s in shards]), tensors["labels"], equal_nan=True)


def test_missing_folder_says_what_to_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="armorm extract"):
        load_features(tmp_path)


# ---------------------------------------------------------------- head files


def test_regression_file_round_trip(tmp_path):
    weight, alpha = torch.randn(3, 8), torch.tensor([1e-4, 1.0, 1e4], dtype=torch.float64)
    save_regression(tmp_path / "r.safetensors", weight, alpha, ["a", "b", "c"], extra_metadata={"seed": 3})
    loaded_weight, loaded_alpha, objectives = load_regression(tmp_path / "r.safetensors")
    assert objectives == ["a", "b", "c"] and loaded_weight.dtype == torch.float32
    torch.testing.assert_close(loaded_weight, weight)
    assert loaded_alpha.tolist() == alpha.tolist()
    with pytest.raises(ValueError, match="objectives"):
        save_regression(tmp_path / "bad.safetensors", weight, alpha, ["a", "b"])


def test_transform_file_round_trip(tmp_path):
    k, verbosity = 4, 2
    penalties = torch.tensor([0.1, 0.2, 0.0, 0.3])
    matrix = torch.eye(k)
    matrix[verbosity, :] -= penalties
    matrix[verbosity, verbosity] = 0
    save_transform(
        tmp_path / "t.safetensors", matrix, penalties, list("abcd"), verbosity="c", extra_metadata={"tau": 0.03}
    )
    loaded, loaded_penalties, metadata = load_transform(tmp_path / "t.safetensors")
    torch.testing.assert_close(loaded, matrix)
    torch.testing.assert_close(loaded_penalties, penalties)
    assert metadata == {"objectives": list("abcd"), "verbosity": "c", "tau": 0.03}  # the objective's name


def test_gating_file_round_trip_loads_strictly_into_the_network(tmp_path):
    network = ArmoRMGatingNetwork(in_features=6, num_objectives=3, hidden_dim=8, n_hidden=2, temperature=10.0)
    save_gating(tmp_path / "g.safetensors", network.state_dict(), temperature=10, hidden_dim=8, n_hidden=2)
    state_dict, metadata = load_gating(tmp_path / "g.safetensors")
    assert metadata["temperature"] == 10.0 and metadata["hidden_dim"] == 8 and metadata["n_hidden"] == 2
    fresh = ArmoRMGatingNetwork(6, 3, metadata["hidden_dim"], metadata["n_hidden"], metadata["temperature"])
    fresh.load_state_dict(state_dict, strict=True)
    x = torch.randn(5, 6)
    torch.testing.assert_close(fresh(x), network(x))
    with pytest.raises(ValueError, match="n_hidden = 3"):
        save_gating(tmp_path / "bad.safetensors", network.state_dict(), temperature=10, hidden_dim=8, n_hidden=3)


def test_several_pair_folders_concatenate_in_the_order_given(tmp_path):
    torch.manual_seed(0)
    parts = [
        {"embeddings": torch.randn(n, 2, 4), "prompt_embeddings": torch.randn(n, 4), "index": torch.arange(n).flip(0)}
        for n in (3, 5)
    ]
    for i, part in enumerate(parts):
        write_features(tmp_path / str(i), "pairs", part, shard_rows=2)
    tensors, metas = load_pair_features([tmp_path / "0", tmp_path / "1"])
    for key in ("embeddings", "prompt_embeddings"):
        # each folder's rows come back in its source order (by index), then the next folder's
        expected = torch.cat([part[key].flip(0) for part in parts])
        torch.testing.assert_close(tensors[key], expected, rtol=0, atol=0)
    assert [m["kind"] for m in metas] == ["pairs", "pairs"]
    write_features(tmp_path / "r", "ratings", {"embeddings": torch.randn(2, 4), "labels": torch.zeros(2, 1)})
    with pytest.raises(ValueError, match="mix kinds"):
        load_pair_features([tmp_path / "0", tmp_path / "r"])
