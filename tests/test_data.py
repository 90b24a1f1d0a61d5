"""Calibration sources, the paper's sampler, packing, BOS policy, minibatches."""

import json

import numpy as np
import pytest
from tiny_models import tiny_tokenizer

from swm_ray.errors import UserError
from swm_ray.io.data import build_calibration, load_rows, load_texts, minibatches, wants_bos


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def test_crops_are_exact_length_and_seeded(tok, text_jsonl):
    a = build_calibration(str(text_jsonl), tok, samples=8, seq_len=16, batch_size=4, seed=1)
    b = build_calibration(str(text_jsonl), tok, samples=8, seq_len=16, batch_size=4, seed=1)
    c = build_calibration(str(text_jsonl), tok, samples=8, seq_len=16, batch_size=4, seed=2)
    assert a.input_ids.shape == (8, 16)
    np.testing.assert_array_equal(a.input_ids, b.input_ids)
    assert not np.array_equal(a.input_ids, c.input_ids)
    assert a.batches == [(0, 4), (4, 8)]
    # every crop is a contiguous piece of some row's tokens
    rows = [tok(r, add_special_tokens=False)["input_ids"] for r in load_texts(str(text_jsonl))]
    for crop in a.input_ids.tolist():
        assert any(any(r[i : i + 16] == crop for i in range(len(r) - 15)) for r in rows)


def test_packed_mode(tok, text_jsonl):
    cal = build_calibration(str(text_jsonl), tok, samples=6, seq_len=32, batch_size=6, mode="packed")
    assert cal.input_ids.shape == (6, 32)


def test_bos_policy(tok, text_jsonl):
    assert not wants_bos(tok, "llama", "auto")  # this tokenizer adds no BOS by itself
    assert wants_bos(tok, "gemma3_text", "auto")  # Gemma degrades without BOS
    assert not wants_bos(tok, "gemma3_text", "never")
    cal = build_calibration(str(text_jsonl), tok, samples=4, seq_len=16, batch_size=4, bos="always")
    assert cal.bos_prepended and (cal.input_ids[:, 0] == tok.bos_token_id).all()
    assert cal.input_ids.shape == (4, 16)


def test_pretokenized_used_as_given(tok, tokens_parquet):
    import pyarrow.parquet as pq

    given = np.asarray(pq.read_table(tokens_parquet).column("input_ids").to_pylist())
    cal = build_calibration(str(tokens_parquet), tok, samples=8, seq_len=999, batch_size=4, bos="always")
    np.testing.assert_array_equal(cal.input_ids, given[:8])  # file order, unmodified, no BOS added
    assert cal.pretokenized and not cal.bos_prepended


def test_minibatch_boundaries():
    assert minibatches(10, 5) == [(0, 5), (5, 10)]
    assert minibatches(13, 5) == [(0, 5), (5, 10)]  # a tail of 3 cannot form an unbiased minibatch
    assert minibatches(14, 5) == [(0, 5), (5, 10), (10, 14)]


def test_builtin_sources():
    rows = load_texts("builtin:lambada")
    assert len(rows) > 2500 and all(isinstance(r, str) for r in rows[:5])
    assert len(load_texts("builtin:boolq-passages")) > 3000


def test_text_and_jsonl_files(tmp_path):
    (tmp_path / "a.txt").write_text("first paragraph\nstill first\n\nsecond one\n")
    assert load_rows(str(tmp_path / "a.txt")) == ["first paragraph\nstill first", "second one"]
    (tmp_path / "b.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(UserError, match="no 'text' field"):
        load_rows(str(tmp_path / "b.jsonl"))
    assert load_rows(str(tmp_path / "b.jsonl"), text_column="body") == ["x"]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(samples=100, seq_len=16, batch_size=4), "only .* rows have at least 16 tokens"),
        (dict(samples=8, seq_len=5000, batch_size=4), "no row has 5000 tokens"),
        (dict(samples=8, seq_len=16, batch_size=3), "at least 4"),
        (dict(samples=3, seq_len=16, batch_size=4), "at least 4 sequences"),
    ],
)
def test_bad_calibration_requests(tok, text_jsonl, kwargs, message):
    with pytest.raises(UserError, match=message):
        build_calibration(str(text_jsonl), tok, **kwargs)


def test_missing_and_unknown_sources(tok):
    with pytest.raises(UserError, match="file not found"):
        load_rows("/nonexistent/data.parquet")
    with pytest.raises(UserError, match="unknown builtin data"):
        load_rows("builtin:nope")


def _old_packed(rows, tok, samples, body_len, seed):
    """The packed sampler before prefix-stable draws (a plain run must still get exactly these rows)."""
    import random

    stream = []
    for start in range(0, len(rows), 512):
        for ids in tok(rows[start:start + 512], add_special_tokens=False)["input_ids"]:
            stream.extend(ids + [tok.eos_token_id])
        if len(stream) >= body_len * samples * 4:
            break
    picks = sorted(random.Random(seed).sample(range(len(stream) // body_len), samples))
    return [stream[p * body_len:(p + 1) * body_len] for p in picks]


@pytest.fixture(scope="module")
def many_rows(tmp_path_factory):
    """300 text rows and 200 pre-tokenized rows, no two alike (random word sequences): enough for 8 planning,
    8 validation and 120 further fit rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from tiny_models import SENTENCES

    words = sorted({w for s in SENTENCES for w in s.split()})
    rng = np.random.default_rng(11)
    d = tmp_path_factory.mktemp("many")
    with open(d / "text.jsonl", "w") as f:
        for _ in range(300):
            f.write(json.dumps({"text": " ".join(rng.choice(words, size=14))}) + "\n")
    pq.write_table(pa.table({"input_ids": rng.integers(4, 256, size=(200, 16)).tolist()}), d / "tokens.parquet")
    return d


@pytest.mark.parametrize("mode, source", [("crops", "text.jsonl"), ("packed", "text.jsonl"),
                                          ("packed-small-chunks", "text.jsonl"), ("pretokenized", "tokens.parquet")])
def test_calibration_sets_keep_the_planning_rows(tiny_llama_dir, many_rows, monkeypatch, mode, source):
    """Auto's validation rows and the fit's further rows never change the planning rows (the rows of a run with
    data.samples alone), in every data mode, and never repeat one of them."""
    from swm_ray.config import build_config
    from swm_ray.io import data

    if mode == "packed-small-chunks":  # the two budgets (first rows, all rows) end after different chunks
        monkeypatch.setattr(data, "_CHUNK", 8)
    cfg = build_config(flags={"model.source": str(tiny_llama_dir), "data.source": str(many_rows / source),
                              "data.samples": 8, "data.seq_len": 16, "data.batch_size": 4,
                              "data.mode": "crops" if mode in ("crops", "pretokenized") else "packed",
                              "merge.fit_samples": 128})
    _, alone, _ = data.calibration_for(cfg)
    sets = data.calibration_sets(cfg, validation=8, fit=True)
    assert sets.note is None and sets.fit.input_ids.shape[0] == 128 and sets.validation.input_ids.shape[0] == 8
    np.testing.assert_array_equal(sets.plan.input_ids, alone.input_ids)
    np.testing.assert_array_equal(sets.fit.input_ids[:8], alone.input_ids)
    plan = {tuple(r) for r in alone.input_ids.tolist()}
    val = {tuple(r) for r in sets.validation.input_ids.tolist()}
    further = {tuple(r) for r in sets.fit.input_ids[8:].tolist()}
    assert len(plan) == 8 and len(val) == 8 and len(further) == 120
    assert not plan & val and not plan & further and not val & further
    # the validation rows do not depend on whether fit rows are drawn (crops, pre-tokenized: the next rows)
    if mode in ("crops", "pretokenized"):
        np.testing.assert_array_equal(data.calibration_sets(cfg, validation=8).validation.input_ids,
                                      sets.validation.input_ids)


def test_packed_plain_run_unchanged(tok, many_rows):
    rows = load_texts(str(many_rows / "text.jsonl"))
    cal = build_calibration(str(many_rows / "text.jsonl"), tok, samples=8, seq_len=16, batch_size=4, mode="packed",
                            seed=5)
    assert cal.input_ids.tolist() == _old_packed(rows, tok, 8, 16, 5)
