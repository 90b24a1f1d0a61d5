"""`swm-ray analyze` end to end on a tiny model: distributed == single, artifacts, bad input."""

import json
import subprocess
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from swm_ray.cli import app
from swm_ray.config import build_config
from swm_ray.jobs.analyze import run_analyze


def _cfg(model_dir, data, out, actors=1, **sets):
    base = {"model.source": str(model_dir), "data.source": str(data), "data.samples": 16, "data.seq_len": 16,
            "data.batch_size": 4, "ray.actors": actors, "out": str(out)}
    return build_config(flags=base, sets=sets)


def test_two_actors_equal_one(ray_session, tiny_llama_dir, tokens_parquet, tmp_path):
    one = run_analyze(_cfg(tiny_llama_dir, tokens_parquet, tmp_path / "one", actors=1))
    two = run_analyze(_cfg(tiny_llama_dir, tokens_parquet, tmp_path / "two", actors=2))
    assert (one["actors"], two["actors"]) == (1, 2)
    a = np.load(tmp_path / "one" / "similarity.npy")
    b = np.load(tmp_path / "two" / "similarity.npy")
    assert a.shape == (7, 7) and a.dtype == np.float64
    np.testing.assert_allclose(a, b, atol=1e-9, rtol=0)
    np.testing.assert_allclose(np.diag(a), 1.0)
    np.testing.assert_allclose(a, a.T, atol=1e-12)


def test_artifacts(ray_session, tiny_llama_dir, tokens_parquet, tmp_path):
    import pyarrow.parquet as pq

    out = tmp_path / "an"
    run_analyze(_cfg(tiny_llama_dir, tokens_parquet, out, **{"stats.kernel": "rbf", "stats.skip_first_tokens": 0}))
    names = {p.name for p in out.iterdir()}
    assert {"similarity.npy", "similarity.parquet", "similarity.png", "stats.json", "config.yaml",
            "config.resolved.yaml"} <= names
    stats = json.loads((out / "stats.json").read_text())
    assert stats["tokens"] == 16 * 16 and stats["minibatches"] == 4 and stats["kernel"] == "rbf"
    assert "note" in stats  # first position kept: the output says so
    t = pq.read_table(out / "similarity.parquet").to_pandas()
    m = np.load(out / "similarity.npy")
    row = t[(t.i == 2) & (t.j == 5)].iloc[0]
    assert row.cka == pytest.approx(m[2, 5]) and row.label_i == "L1" and row.label_j == "L4"
    assert (out / "similarity.png").read_bytes()[:4] == b"\x89PNG"


runner = CliRunner()


def _cli(*args):
    res = runner.invoke(app, ["analyze", *map(str, args)])
    return res.exit_code, res.output


@pytest.mark.parametrize(
    "make_args, message",
    [
        (lambda m, d, t: ["/nonexistent/model", "--data", d], "not found"),
        (lambda m, d, t: [m, "--data", t / "missing.parquet"], "file not found"),
        (lambda m, d, t: [m, "--data", d, "--samples", "100", "--seq-len", "16"], "pre-tokenized rows"),
        (lambda m, d, t: [m, "--data", d, "--batch-size", "3"], "batch size must be at least 4"),
        (lambda m, d, t: [m, "--data", d, "--kernel", "cubic"], "stats.kernel"),
    ],
)
def test_bad_input_one_line_errors(ray_session, tiny_llama_dir, tokens_parquet, tmp_path, make_args, message):
    out = tmp_path / "out"
    code, output = _cli(*make_args(tiny_llama_dir, tokens_parquet, tmp_path), "--out", out)
    assert code != 0
    assert message in output and "Traceback" not in output
    assert len(output.strip().splitlines()) == 1
    assert not out.exists()


def test_refuses_foreign_output_and_non_decoders(ray_session, tiny_llama_dir, tokens_parquet, tmp_path):
    from tiny_models import tiny_t5

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("keep me")
    code, output = _cli(tiny_llama_dir, "--data", tokens_parquet, "--out", foreign)
    assert code != 0 and "not written by swm-ray" in output
    assert [p.name for p in foreign.iterdir()] == ["precious.txt"]

    t5 = tmp_path / "t5"
    tiny_t5().save_pretrained(t5)
    code, output = _cli(t5, "--data", tokens_parquet, "--out", tmp_path / "o2")
    assert code != 0 and "encoder-decoder" in output and not (tmp_path / "o2").exists()


def test_help_is_fast_and_light():
    code = ("import sys, swm_ray.cli; "
            "bad = [m for m in ('torch', 'ray', 'transformers') if m in sys.modules]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_statistics_cache_key_names_the_weights_and_the_precision(tmp_path, tokens_parquet):
    """The CKA cache is keyed by what the statistics depend on: a model folder rewritten in place (same path,
    same tokenizer, so the same token ids) and another compute precision get keys of their own."""
    import time

    from tiny_models import tiny_model, tiny_tokenizer

    from swm_ray.io.data import calibration_for
    from swm_ray.jobs.analyze import stats_cache_key

    folder = tmp_path / "m"
    model, _ = tiny_model("llama", n_layers=4, seed=0)
    model.save_pretrained(folder)
    tiny_tokenizer(folder)
    cfg = build_config(flags={"model.source": str(folder), "data.source": str(tokens_parquet), "data.samples": 8,
                              "data.seq_len": 16, "data.batch_size": 4})
    _, calib, _ = calibration_for(cfg)
    key = stats_cache_key(cfg, calib)
    assert stats_cache_key(cfg, calib) == key  # nothing changed: the cache is found again
    time.sleep(0.01)
    tiny_model("llama", n_layers=4, seed=1)[0].save_pretrained(folder)  # other weights at the same path
    rewritten = stats_cache_key(cfg, calib)
    assert rewritten != key
    bf16 = cfg.model_copy(update={"model": cfg.model.model_copy(update={"dtype": "bfloat16"})})
    assert stats_cache_key(bf16, calib) not in (key, rewritten)
