"""Pinned hub revisions reach every load, and tied embeddings survive compress -> save -> reload.

The hub is not reachable from the test machines, so the revision test builds a hub cache by hand (the
layout `huggingface_hub` reads offline: refs/<branch> holding a commit, snapshots/<commit>/files) with two
commits of one repository whose weights differ, and pins the one that is not on `main`.
"""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from swm_ray.config import build_config
from swm_ray.errors import UserError
from swm_ray.io.checkpoint import Checkpoint
from swm_ray.io.checkpoint import weights_checksum as _checksum
from swm_ray.io.models import resolve_model_path
from swm_ray.recipes.pipeline import compress_here


def weights_checksum(path) -> str:
    return _checksum(Checkpoint(str(path)))


REPO = "swm-test/tiny-revisions"
MAIN, PINNED = "a" * 40, "b" * 40


@pytest.fixture()
def hub_cache(tmp_path, monkeypatch):
    """A two-commit offline hub cache for REPO (main -> MAIN); seeds differ so the weights differ."""
    from huggingface_hub import constants
    from tiny_models import tiny_model, tiny_tokenizer

    root = tmp_path / "hub"
    repo = root / ("models--" + REPO.replace("/", "--"))
    for commit, seed in ((MAIN, 0), (PINNED, 5)):
        snap = repo / "snapshots" / commit
        model, _ = tiny_model("llama", n_layers=6, seed=seed)
        model.save_pretrained(snap)
        tiny_tokenizer(snap)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(MAIN)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(root))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return repo


def test_revision_selects_the_snapshot_and_is_refused_where_it_cannot_apply(hub_cache, tiny_llama_dir):
    assert resolve_model_path(REPO).endswith(MAIN)
    assert resolve_model_path(REPO, PINNED).endswith(PINNED)
    with pytest.raises(UserError, match="cannot fetch it from the hub"):
        resolve_model_path(REPO, "c" * 40)
    with pytest.raises(UserError, match="applies to hub ids only"):
        resolve_model_path(str(tiny_llama_dir), PINNED)


def test_compress_merges_the_pinned_revision_and_records_it(hub_cache, tokens_parquet, tmp_path):
    """Calibration, selection and the merged weights all come from the pinned commit, and the plan says so:
    the output equals compressing that commit's folder by path."""
    common = {"data.source": str(tokens_parquet), "data.samples": 16, "data.seq_len": 16,
              "data.batch_size": 4, "select.layers": 2, "select.method": "swm"}
    pinned = compress_here(build_config(flags={**common, "model.source": REPO, "model.revision": PINNED,
                                               "out": str(tmp_path / "pinned")}))
    by_path = compress_here(build_config(flags={**common, "model.source": str(hub_cache / "snapshots" / PINNED),
                                                "out": str(tmp_path / "by-path")}))
    on_main = compress_here(build_config(flags={**common, "model.source": REPO, "out": str(tmp_path / "main")}))
    plan = json.loads((tmp_path / "pinned" / "plan.json").read_text())
    assert plan["source_revision"] == PINNED
    assert plan["source_checksum"] == weights_checksum(str(hub_cache / "snapshots" / PINNED))
    assert plan["source_checksum"] != weights_checksum(str(hub_cache / "snapshots" / MAIN))
    assert pinned["plan"]["windows"] == by_path["plan"]["windows"]
    assert weights_checksum(str(tmp_path / "pinned")) == weights_checksum(str(tmp_path / "by-path"))
    assert weights_checksum(str(tmp_path / "pinned")) != weights_checksum(str(tmp_path / "main"))
    assert on_main["plan"]["source_revision"] is None


def test_tied_embeddings_survive_compress_save_and_reload(tokens_parquet, tmp_path):
    """A model whose LM head is its embedding matrix: the folder keeps one tensor, the config keeps the tie,
    and the reloaded model gives the logits of the model merged in memory."""
    from tiny_models import tiny_config, tiny_tokenizer

    from swm_ray.edits.merge import apply_windows

    src = tmp_path / "tied"
    config = tiny_config("llama", 6)
    config.tie_word_embeddings = True
    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    model.save_pretrained(src)
    tiny_tokenizer(src)
    res = compress_here(build_config(flags={
        "model.source": str(src), "data.source": str(tokens_parquet), "data.samples": 16, "data.seq_len": 16,
        "data.batch_size": 4, "select.layers": 2, "merge.method": "mean", "select.method": "swm",
        "out": str(tmp_path / "out")}))
    out = tmp_path / "out"
    saved = json.loads((out / "config.json").read_text())
    assert saved.get("tie_word_embeddings", True) is True
    from safetensors import safe_open

    names = set()
    for f in out.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            names |= set(st.keys())
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()
    expected = apply_windows(AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval(),
                             res["plan"]["windows"], "mean")
    ids = torch.randint(4, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, expected(ids).logits, rtol=1e-5, atol=1e-5)
    assert res["plan"]["params_after"] < res["plan"]["params_before"]


def test_the_plan_executor_keeps_two_revisions_of_one_source_apart(hub_cache):
    """`source_model`/`plan_model` share a cache across plans: two revisions of one hub id are two sources."""
    from swm_ray.plan.executor import source_model

    cache: dict = {}
    main, _ = source_model(REPO, cache)
    pinned, _ = source_model(REPO, cache, revision=PINNED)
    assert len(cache) == 2
    w = "model.layers.0.mlp.down_proj.weight"
    assert not torch.equal(main.state_dict()[w], pinned.state_dict()[w])
