"""`grid.heal`: healing as an axis of the grid. One trial reports, per target, the un-healed row and one row per
heal mode, the same compressed model healed in the trial's process (local: each merged layer refit against the
original; lora: a few LoRA steps as one worker, no Ray Train) and evaluated the same way."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from swm_ray.cli import app
from swm_ray.config import build_config
from swm_ray.recipes.results import finalize_rows, markdown_table
from swm_ray.recipes.specs import method_label
from swm_ray.recipes.trial import run_trial

TEMPERATURE = 0.7
SWM = {"method": "swm", "criterion": "output", "search": "best-first", "merge": "reference"}


pytestmark = pytest.mark.usefixtures("one_thread")


def sample_texts(model_dir, n: int = 40, length: int = 24, temperature: float = 0.7) -> list[str]:
    """Text sampled from the model itself, from tokens that survive a decode/encode round trip."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    good = [i for _, i in sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
            if i >= 4 and (s := tok.decode([i])) and s.isascii() and s.isprintable()
            and tok(s, add_special_tokens=False).input_ids == [i]]
    mask = torch.full((model.config.vocab_size,), float("-inf"))
    mask[good] = 0
    gen = torch.Generator().manual_seed(0)
    texts = []
    for r in range(n):
        ids = torch.tensor([[good[r % len(good)]]])
        for _ in range(length):
            with torch.no_grad():
                logits = model(ids).logits[0, -1] / temperature + mask
            ids = torch.cat([ids, torch.multinomial(torch.softmax(logits, -1), 1, generator=gen)[None]], 1)
        texts.append(tok.decode(ids[0]))
    return texts


@pytest.fixture(scope="module")
def sampled_text(tiny_llama_dir, tmp_path_factory):
    """(train, held-out) text sampled from the original tiny Llama itself (fixed seed): the scripted case on which
    healing a compressed copy, towards the original (local) or on the train part (lora), lowers its held-out
    perplexity."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)  # module fixtures run outside _one_thread
    try:
        texts = sample_texts(tiny_llama_dir, temperature=TEMPERATURE)
    finally:
        torch.set_num_threads(saved)
    folder = tmp_path_factory.mktemp("sampled")
    paths = []
    for name, part in (("train", texts[:20]), ("heldout", texts[20:])):
        paths.append(folder / f"{name}.jsonl")
        paths[-1].write_text("".join(json.dumps({"text": t}) + "\n" for t in part))
    return paths


def _cfg(model, calib_data, ppl_data, heal: list[str], **flags):
    return build_config(flags={"model.source": str(model), "data.source": str(calib_data), "data.samples": 8,
                               "data.seq_len": 16, "data.batch_size": 4, "eval.tasks": [],
                               "eval.ppl_data": str(ppl_data), "eval.ppl_chunk": 16, "eval.ppl_max_tokens": 256,
                               **flags},
                        sets={"grid.layers": [1, 2], "grid.criteria": ["output"], "grid.baselines": [],
                              "grid.heal": heal})


def _run(cfg, model, spec=None) -> list[dict]:
    from swm_ray.io.data import calibration_for

    _, calib, _ = calibration_for(cfg)
    rows: list[dict] = []
    run_trial({"model": str(model), **(spec or SWM)}, cfg, str(model), calib, None, rows.append)
    return rows


def test_local_heal_rows_beside_the_unhealed_ones(tiny_llama_dir, tokens_parquet, sampled_text):
    """Two rows per target, same windows; the healed one is refit against the original (held-out perplexity on
    the original's own text goes down); the original model's row is never healed; rows make a table."""
    train, heldout = sampled_text
    cfg = _cfg(tiny_llama_dir, tokens_parquet, heldout, ["none", "local"], **{
        "heal.data": str(train), "heal.steps": 100, "heal.lr": 1e-3, "heal.local_samples": 20,
        "heal.local_seq_len": 16})
    rows = _run(cfg, tiny_llama_dir)
    assert [(r["target"], r["heal"]) for r in rows] == [(1, "none"), (1, "local"), (2, "none"), (2, "local")]
    for plain, healed in (rows[0:2], rows[2:4]):
        assert plain["status"] == healed["status"] == "ok"
        assert healed["windows"] == plain["windows"] and healed["layers_after"] == plain["layers_after"]
        assert plain.get("heal_seconds") is None and healed["heal_seconds"] > 0
        # not the un-healed model evaluated twice: healing moved it towards the original
        assert healed["ppl"] < plain["ppl"] * 0.99, (plain["ppl"], healed["ppl"])
    original = _run(cfg, tiny_llama_dir, {"method": "original"})
    assert [(r["heal"], r["removed_layers"], r.get("heal_seconds")) for r in original] == [("none", 0, None)]

    table = finalize_rows(original + rows)
    json.dumps(table)  # JSON friendly (Tune reports, rows.jsonl)
    import pyarrow as pa

    assert pa.Table.from_pylist(table).column("heal").to_pylist() == ["none", "none", "none", "local", "local"]
    assert method_label(rows[1]) == "output / best-first / reference + heal local"
    md = markdown_table(table)
    assert md.count("+ heal local") == 2


def test_lora_heal_row_runs_in_process(tiny_llama_dir, tokens_parquet, sampled_text):
    """A couple of LoRA steps on heal.data in the trial's process, the adapter merged: the row differs from the
    un-healed one (trained on the original's text, it predicts the held-out part better)."""
    train, heldout = sampled_text
    cfg = _cfg(tiny_llama_dir, tokens_parquet, heldout, ["none", "lora"], **{
        "heal.data": str(train), "heal.steps": 3, "heal.lr": 1e-2, "heal.batch_size": 8, "heal.cutoff": 16,
        "heal.warmup_steps": 0})
    cfg = cfg.model_copy(update={"grid": cfg.grid.model_copy(update={"layers": (2,)})})
    rows = _run(cfg, tiny_llama_dir)
    assert [(r["target"], r["heal"], r["status"]) for r in rows] == [(2, "none", "ok"), (2, "lora", "ok")]
    assert rows[1]["heal_seconds"] > 0 and rows[1]["windows"] == rows[0]["windows"]
    assert rows[1]["ppl"] < rows[0]["ppl"] * 0.99, (rows[0]["ppl"], rows[1]["ppl"])
    assert rows[1]["params_after"] == rows[0]["params_after"]  # the adapter was merged, not kept beside


def test_heal_axis_without_none_and_a_streaming_model(tiny_llama_dir, tokens_parquet, text_jsonl):
    """grid.heal [local] alone reports healed rows only; a model that streams one layer at a time cannot be
    healed in a grid: a skipped row with a one-line note."""
    cfg = _cfg(tiny_llama_dir, tokens_parquet, text_jsonl, ["local"], **{"model.stream": "always",
                                                                        "heal.steps": 2})
    rows = _run(cfg, tiny_llama_dir)
    assert [(r["target"], r["heal"], r["status"]) for r in rows] == [(1, "local", "skipped"),
                                                                     (2, "local", "skipped")]
    assert all("needs the model in memory" in r["note"] and "\n" not in r["note"] for r in rows)
    assert all(r.get("plan") for r in rows)  # the plan is still there to apply and heal by hand


def test_cli_parses_heal_into_the_grid_config(monkeypatch, tmp_path):
    import swm_ray.jobs.grid as grid_job

    seen = {}

    def fake_run_grid(cfg, raw="", resume=None):
        seen["cfg"] = cfg
        return {"rows_table": [], "trials": 0, "rows": 0, "errors": 0, "seconds": 0.0, "files": [],
                "out": str(tmp_path / "g")}

    monkeypatch.setattr(grid_job, "run_grid", fake_run_grid)
    res = CliRunner().invoke(app, ["grid", "m", "--layers", "2", "--heal", "none, local", "--out",
                                   str(tmp_path / "g")])
    assert res.exit_code == 0, res.output
    assert seen["cfg"].grid.heal == ("none", "local")
    assert build_config().grid.heal == ()


def test_an_unknown_heal_mode_is_a_one_line_error(tmp_path):
    res = CliRunner().invoke(app, ["grid", "m", "--layers", "2", "--heal", "none,magic", "--out",
                                   str(tmp_path / "g")])
    assert res.exit_code == 2, res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "grid.heal" in lines[0], res.output
    assert not (tmp_path / "g").exists()
