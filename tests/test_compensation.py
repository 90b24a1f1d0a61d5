"""Compensation: the fold is exact on every architecture, the sums are additive over rows and actors, windows
are fitted bottom-up on the compressed model's own input, ReplaceMe picks the hand-computed block, and a
compensated folder reloads with plain transformers and is reproduced byte for byte by `apply`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import ARCHS, tiny_model
from transformers import AutoModelForCausalLM

from swm_ray.compute.fitpass import CompSums, FitPass, accumulate, add_sums, capture_output, compensation_sums
from swm_ray.compute.stack import InMemoryStack
from swm_ray.config import build_config
from swm_ray.edits.fold import Fit, compensate_model, fold_site, stack_site
from swm_ray.edits.merge import apply_windows
from swm_ray.errors import UserError
from swm_ray.io.checkpoint import Checkpoint
from swm_ray.io.models import load_config
from swm_ray.methods.compensation import fit_windows, make_fit
from swm_ray.plan.executor import PlanView, materialize
from swm_ray.plan.plan import Plan

IDS = np.random.default_rng(5).integers(4, 256, size=(8, 12))
BATCHES = [(0, 4), (4, 8)]


def _saved(arch: str, folder: Path, n_layers: int = 6):
    model, tok = tiny_model(arch, n_layers=n_layers)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return model


def _fits(stack, windows, method="lstsq", source="compressed", merge="reference"):
    fp = FitPass(stack, IDS, BATCHES, windows, merge, "global", source=source)
    return fit_windows(fp.advance, method, stack_site(stack))


def _fits_from_the_embeddings(stack, windows, method="lstsq", merge="reference"):
    """The fits as a pass per window computes them: every window's sums from a fresh pass from the embeddings,
    with the fits below folded in (O(W·L) layer runs)."""
    fits = {}
    for w in sorted(tuple(w) for w in windows):
        (s,) = compensation_sums(stack, IDS, BATCHES, windows, merge, "global", dict(fits), [w])
        fits[w] = make_fit(w, s, method, stack_site(stack))
    return fits


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", ["lstsq", "scale"])
def test_fold_adds_exactly_m_times_t_minus_i(tmp_path, arch, method):
    """The layer a plan compensates, as the executor writes it, returns the plain merged layer's output plus
    m·(T − I), m being the plain layer's MLP output (Gemma 2/3: a diagonal T, folded into the post-MLP norm)."""
    model = _saved(arch, tmp_path)
    windows = [[1, 2], [3, 4]]
    fits = _fits(InMemoryStack(model), windows, method)
    assert {f.kind for f in fits.values()} == {
        "scalar" if method == "scale" else "diagonal" if arch.startswith("gemma") else "matrix"}
    ckpt, config = Checkpoint(tmp_path), load_config(str(tmp_path))
    plain = PlanView(ckpt, config, windows, "reference")
    fitted = PlanView(ckpt, config, windows, "reference", fits=fits)
    a = InMemoryStack(materialize(plain, plain.config))
    b = InMemoryStack(materialize(fitted, fitted.config))
    site = stack_site(a)
    pro = a.prologue(torch.tensor(IDS[:4]))
    h = pro.hidden
    for pos in range(a.num_layers):
        with torch.inference_mode(), capture_output(a.layers[pos], site) as got:
            want = a.run(a.layers[pos], h, pro.kwargs[pos])
        out = b.run(b.layers[pos], h, pro.kwargs[pos])
        window = {1: (1, 2), 2: (3, 4)}.get(pos)
        if window is None:
            torch.testing.assert_close(out, want, rtol=0, atol=0)
        else:
            fit = fits[window]
            t = fit.tensor if fit.kind == "matrix" else torch.diag(fit.tensor.expand(want.shape[-1]))
            m = got[-1]
            torch.testing.assert_close(out, want + m @ (t - torch.eye(t.shape[0])), rtol=1e-5, atol=1e-5)
        h = want
    # the in-memory fold (grid trials) gives the executor's tensors bit for bit
    apply_windows(model, windows, "reference")
    compensate_model(model, windows, fits)
    for name, p in model.state_dict().items():
        if name in fitted.infos:
            assert torch.equal(p, fitted.read(name)), name


def test_gemma_style_norm_without_a_known_fold_is_refused():
    names = ["mlp.down_proj.weight", "post_feedforward_layernorm.weight"]
    with pytest.raises(UserError, match="no exact fold") as e:
        fold_site("olmo2", names)
    assert "\n" not in str(e.value)
    assert fold_site("gemma2", names).unit_offset and fold_site("llama", names[:1]).module == "mlp"


def test_sums_are_additive_over_rows(tmp_path):
    stack = InMemoryStack(_saved("qwen3", tmp_path))
    windows = [[1, 3]]
    (whole,) = compensation_sums(stack, IDS, BATCHES, windows, "mean", "global", {}, windows)
    parts = [compensation_sums(stack, IDS, [b], windows, "mean", "global", {}, windows)[0] for b in BATCHES]
    total = add_sums(parts)
    assert total.tokens == whole.tokens == 8 * 11  # the first position of every row is left out
    np.testing.assert_allclose(total.mtm, whole.mtm, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(total.mtb, whole.mtb, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("arch", ["qwen2", "gemma3"])
def test_streaming_sums_equal_in_memory(tmp_path, arch):
    """Actors that stream their model one layer at a time compute the same sums (fits below folded in)."""
    from swm_ray.compute.stack import StreamingStack

    model = _saved(arch, tmp_path)
    windows = [[1, 2], [3, 4]]
    mem = InMemoryStack(model)
    fits = _fits(mem, windows[:1])
    want = compensation_sums(mem, IDS, BATCHES, windows, "mean", "global", fits, [(3, 4)])[0]
    stream = StreamingStack.from_path(str(tmp_path), torch.device("cpu"), torch.float32)
    got = compensation_sums(stream, IDS, BATCHES, windows, "mean", "global", fits, [(3, 4)])[0]
    assert got.tokens == want.tokens
    np.testing.assert_allclose(got.mtb, want.mtb, rtol=1e-5, atol=1e-5 * np.abs(want.mtb).max())


def test_sums_over_one_and_two_actors_agree(ray_session, tiny_llama_dir, tokens_parquet):
    """Two actors, each running the fit pass on its own minibatches, and one process running it on all of them
    agree to 1e-9, window after window."""
    from swm_ray.compute.refpass import Needs
    from swm_ray.io.data import calibration_for
    from swm_ray.jobs.pool import RayBackend

    cfg = build_config(flags={"model.source": str(tiny_llama_dir), "data.source": str(tokens_parquet),
                              "data.samples": 16, "data.seq_len": 16, "data.batch_size": 4, "ray.actors": 2})
    _, calib, _ = calibration_for(cfg)
    windows = [[1, 2], [3, 4]]
    backend = RayBackend(cfg, calib)
    try:
        backend.reference(Needs())
        fp = backend.fit_pass(windows, "reference", source="compressed", skip_first=1)
        two = [fp.advance(), fp.advance(), fp.advance()]
    finally:
        backend.shutdown()
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir)).eval()
    here = FitPass(InMemoryStack(model), calib.input_ids, calib.batches, windows, "reference", "global")
    one = [here.advance(), here.advance(), here.advance()]
    assert two[2] is None and one[2] is None
    for (wa, a), (wb, b) in zip(one[:2], two[:2]):
        assert wa == wb and a.tokens == b.tokens == 16 * 15
        for x, y in ((a.mtm, b.mtm), (a.mtb, b.mtb)):
            assert np.abs(x - y).max() <= 1e-9 * np.abs(x).max()


def test_several_plans_fitted_on_actors_equal_in_process_and_every_pass_is_dropped(ray_session, tiny_llama_dir,
                                                                                    tokens_parquet, monkeypatch):
    """auto's fits of several plans (one climb, forks that share the original's layer outputs) over two actors
    equal the in-process fits, and when they are done every pass is dropped on the actors (with what the climb
    kept): the next step of each is then 'missing' there, where a pass still held would take it."""
    import ray

    from swm_ray.compute.refpass import Needs
    from swm_ray.io.data import calibration_for
    from swm_ray.jobs import pool as pool_mod
    from swm_ray.methods.auto import _fit_plans
    from swm_ray.methods.session import LocalScoring, Scoring

    cfg = build_config(flags={"model.source": str(tiny_llama_dir), "data.source": str(tokens_parquet),
                              "data.samples": 16, "data.seq_len": 16, "data.batch_size": 4, "ray.actors": 2})
    _, calib, _ = calibration_for(cfg)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir)).eval()
    site = stack_site(InMemoryStack(model))
    jobs = {i: (f"p{i}", cfg, "lstsq", w, m) for i, (w, m) in
            enumerate([([(3, 4)], "keep-first"), ([(1, 2)], "reference"), ([(1, 3)], "keep-first")])}
    closed = []
    real_close = pool_mod.RemoteFitPass.close

    def spy(self):
        closed.append((self, len(self.ops)))
        real_close(self)

    monkeypatch.setattr(pool_mod.RemoteFitPass, "close", spy)
    backend = pool_mod.RayBackend(cfg, calib)
    try:
        backend.reference(Needs())
        scoring = Scoring(backend)
        scoring.site_for = lambda: site
        made = _fit_plans(scoring, jobs)
        assert len(closed) == 1 + len(jobs)  # the climb and a fork per plan
        for fp, step in closed:
            got = ray.get([backend.pool.actors[j].fit_step.remote(backend.jobs[j], fp.id, step, ("advance", None, None))
                           for j in fp.owners])
            assert got == ["missing"] * len(fp.owners)
    finally:
        backend.shutdown()
    here = _fit_plans(LocalScoring(InMemoryStack(model), calib), jobs)
    for k in jobs:
        for w, f in here[k].fits.items():
            torch.testing.assert_close(made[k].fits[w].tensor, f.tensor, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_one_bottom_up_pass_fits_like_a_pass_per_window(tmp_path, arch):
    """All windows fitted in one pass from the embeddings to the top equal the fits of a pass per window
    (within 1e-6), and three windows cost at most one run of each model's layers up to the top window (O(L) layer
    runs whatever the number of windows), where a pass per window costs half as much again. Below its first window
    the compressed model is the original, so those layers run once: one window at 7-8 costs 7 + 2 + 2 runs."""
    model = _saved(arch, tmp_path, n_layers=10)
    stack = InMemoryStack(model)
    windows = [(1, 2), (4, 5), (7, 8)]
    runs0 = stack.token_runs
    one_pass = _fits(stack, windows)
    runs_three = stack.token_runs - runs0
    want = _fits_from_the_embeddings(stack, windows)
    for w in windows:
        torch.testing.assert_close(one_pass[w].tensor, want[w].tensor, rtol=0, atol=1e-6)
    tokens = int(np.asarray(IDS).size)
    runs0 = stack.token_runs
    _fits(stack, [(7, 8)])
    assert stack.token_runs - runs0 == (7 + 2 + 2) * tokens
    assert runs_three <= 2 * 9 * tokens
    runs0 = stack.token_runs
    _fits_from_the_embeddings(stack, windows)
    assert stack.token_runs - runs0 >= 1.5 * runs_three  # what a pass per window costs here


def test_sequential_fit_sees_the_compensated_layers_below(tmp_path):
    """A scripted case: the upper window's sums, with a fit folded into the lower window, are those of the
    compressed model built by hand (merged, lower window compensated) run on the calibration rows; the local
    fit (original input) does not see the lower window at all."""
    model = _saved("llama", tmp_path)
    stack = InMemoryStack(model)
    windows = [[1, 2], [3, 5]]
    d = model.config.hidden_size
    noise = torch.randn(d, d, generator=torch.Generator().manual_seed(0))
    lower = Fit((1, 2), "matrix", torch.eye(d) * 1.5 + 0.05 * noise)
    (seq,) = compensation_sums(stack, IDS, BATCHES, windows, "reference", "global", {(1, 2): lower}, [(3, 5)])
    (plain,) = compensation_sums(stack, IDS, BATCHES, windows, "reference", "global", {}, [(3, 5)])
    assert np.abs(seq.mtb - plain.mtb).max() > 1e-3 * np.abs(plain.mtb).max()  # it does see the fit below

    orig = AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    edited = AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    apply_windows(edited, windows, "reference")
    compensate_model(edited, windows, {(1, 2): lower})
    layer = edited.model.layers[2]  # the merged window 3-5 sits at position 2 (kept: 0, 1, 3)
    site = stack_site(InMemoryStack(edited))
    want = CompSums.zeros(d)
    seen: dict = {}

    def keep(key):
        return lambda mod, args, kwargs, out: seen.update({key: (args[0] if args else kwargs["hidden_states"],
                                                                 out[0] if isinstance(out, tuple) else out)})

    hooks = [orig.model.layers[5].register_forward_hook(keep("orig"), with_kwargs=True),
             layer.register_forward_hook(keep("edited"), with_kwargs=True)]
    with torch.no_grad():
        for a, b in BATCHES:  # the layers' own outputs: hidden_states[-1] would be after the final norm
            ids = torch.tensor(IDS[a:b])
            orig(ids)
            with capture_output(layer, site) as got:
                edited(ids)
            x, out = seen["edited"]
            accumulate(want, x, got[-1], out, seen["orig"][1], 1)
    for h in hooks:
        h.remove()
    np.testing.assert_allclose(seq.mtb, want.mtb, rtol=1e-4, atol=1e-4 * np.abs(want.mtb).max())
    np.testing.assert_allclose(seq.mtm, want.mtm, rtol=1e-4, atol=1e-4 * np.abs(want.mtm).max())
    (loc_a,) = compensation_sums(stack, IDS, BATCHES, windows, "reference", "global", {(1, 2): lower}, [(3, 5)],
                                 source="original")
    (loc_b,) = compensation_sums(stack, IDS, BATCHES, windows, "reference", "global", {}, [(3, 5)],
                                 source="original")
    np.testing.assert_array_equal(loc_a.mtb, loc_b.mtb)
    # the pass stops at each window bottom-up, and the fit handed back is folded before it goes on
    fp = FitPass(stack, IDS, BATCHES, windows, "reference", "global")
    w1, _ = fp.advance()
    w2, s2 = fp.advance(lower)
    assert (w1, w2) == ((1, 2), (3, 5)) and fp.advance() is None
    np.testing.assert_allclose(s2.mtb, seq.mtb, rtol=1e-12, atol=1e-12)


def test_lstsq_fit_reduces_the_window_error(tmp_path):
    stack = InMemoryStack(_saved("mistral", tmp_path))
    (s,) = compensation_sums(stack, IDS, BATCHES, [[2, 4]], "reference", "global", {}, [(2, 4)])
    fit = make_fit((2, 4), s, "lstsq", stack_site(stack))
    assert fit.error_after < fit.error_before and fit.tokens == 88
    ridge = make_fit((2, 4), s, "lstsq", stack_site(stack), ridge=10.0)
    assert fit.error_after <= ridge.error_after  # the plain least squares is the minimum on the fit rows


@pytest.mark.parametrize("tokens", ["last", "all"])
def test_replaceme_picks_the_hand_computed_block(tmp_path, tokens):
    """ReplaceMe's block from the angular distance at the last token (as published), or (`select.replaceme_tokens:
    all`) per row the mean over every position but the first, then over rows: the distances transformers' hidden
    states give by hand."""
    from swm_ray.io.data import Calibration
    from swm_ray.methods.planners import plan_windows
    from swm_ray.methods.session import LocalScoring

    model = _saved("llama", tmp_path, n_layers=8)
    with torch.no_grad():
        hs = model(torch.tensor(IDS), output_hidden_states=True).hidden_states  # hs[8] is after the final norm
    at = (lambda h: h[:, -1, :]) if tokens == "last" else (lambda h: h[:, 1:, :])
    states = [at(h).double() for h in hs[:8]]  # states 0..7
    n = 2
    dist = {}
    for s in range(1, 8 - n):  # state s+n <= 7: the last layer stays (protect_last)
        cos = torch.nn.functional.cosine_similarity(states[s], states[s + n], dim=-1).clamp(-1, 1)
        ang = torch.arccos(cos) / np.pi
        dist[s] = float(ang.mean() if tokens == "last" else ang.mean(1).mean())
    best = min(dist, key=lambda s: (dist[s], s))
    cfg = build_config(flags={"select.method": "replaceme", "select.layers": n, "select.replaceme_tokens": tokens})
    calib = Calibration(IDS, BATCHES, bos_prepended=False, pretokenized=True, source="test")
    planned = plan_windows(cfg, LocalScoring(InMemoryStack(model), calib), 8, n)
    assert planned.selection.windows == [(best - 1, best + n - 1)] and planned.merge == "keep-first"
    assert planned.selection.scores[0] == pytest.approx(dist[best], abs=1e-6)
    if tokens == "all":  # the distances differ from the last token's, so a pass of one does not cover the other
        assert dist != pytest.approx(_last_token_dists(hs, n))
    from swm_ray.methods.planners import method_compensation

    assert method_compensation(cfg) == "lstsq"
    assert method_compensation(build_config(flags={"select.method": "replaceme", "merge.compensate": "none"})) == "none"


def test_compensated_folder_reloads_with_the_same_logits(tmp_path, tokens_parquet):
    from swm_ray.recipes.pipeline import compress_here

    src = tmp_path / "src"
    model = _saved("gemma2", src)
    cfg = build_config(flags={"model.source": str(src), "data.source": str(tokens_parquet), "data.samples": 8,
                              "data.seq_len": 16, "data.batch_size": 4, "select.layers": 2, "select.method": "swm",
                              "merge.compensate": "lstsq", "out": str(tmp_path / "out")})
    res = compress_here(cfg)
    out = Path(res["out"])
    plan = Plan.load(out / "plan.json")
    assert plan.compensated and (out / "plan.tensors").exists()
    assert plan.compensation["tensors_file"] == "plan.tensors"
    assert not (out / "mergekit_config.yml").exists()
    from swm_ray.edits.fold import plan_fits

    fits = plan_fits(plan)
    assert sorted(fits) == sorted(tuple(w) for w in plan.windows)
    apply_windows(model, plan.windows, plan.merge)
    compensate_model(model, plan.windows, fits)
    reloaded = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    ids = torch.tensor(IDS[:2])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
    assert "Compensation: **`lstsq`**" in (out / "README.md").read_text()
    # the saved plan built in memory (no folder) is the same model, and its source is the unedited one
    from swm_ray.plan.executor import plan_model, source_model

    cache: dict = {}
    built, _tok, again = plan_model(out / "plan.json", cache)
    assert again.windows == plan.windows and len(built.model.layers) == 6 - 2
    original, _ = source_model(str(src), cache)
    assert len(cache) == 1 and len(original.model.layers) == 6
    with torch.no_grad():
        torch.testing.assert_close(built(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(original(ids).logits,
                                   AutoModelForCausalLM.from_pretrained(str(src)).eval()(ids).logits)


def test_apply_reproduces_a_compensated_compress_byte_for_byte(ray_session, tiny_llama_dir, tokens_parquet,
                                                              tmp_path):
    from swm_ray.jobs.apply import run_apply
    from swm_ray.jobs.compress import run_compress

    cfg = build_config(flags={"model.source": str(tiny_llama_dir), "data.source": str(tokens_parquet),
                              "data.samples": 16, "data.seq_len": 16, "data.batch_size": 4, "select.layers": 2,
                              "ray.actors": 2, "select.method": "shortgpt", "merge.compensate": "lstsq",
                              "out": str(tmp_path / "c")})
    res = run_compress(cfg)
    comp = res["plan"]["compensation"]
    assert comp["method"] == "lstsq" and comp["input"] == "compressed" and len(comp["windows"]) == len(
        res["plan"]["windows"])
    assert all(w["error_after"] < w["error_before"] for w in comp["windows"])
    assert "overfits" in comp["note"]  # 240 tokens for a 32×32 map: the run says so
    run_apply(build_config(flags={"out": str(tmp_path / "a")}), str(tmp_path / "c" / "plan.json"))
    names = [p.name for p in (tmp_path / "c").iterdir() if p.suffix == ".safetensors"]
    for name in [*names, "config.json", "plan.tensors"]:
        assert (tmp_path / "c" / name).read_bytes() == (tmp_path / "a" / name).read_bytes(), name
    # a compensated plan whose tensors were not kept is refused in one line
    lone = tmp_path / "lone.json"
    lone.write_text((tmp_path / "c" / "plan.json").read_text())
    with pytest.raises(UserError, match="must lie beside it") as e:
        Plan.load(lone)
    assert "\n" not in str(e.value)


def test_plans_without_compensation_still_load(tmp_path):
    old = {"windows": [[3, 4]], "num_layers_before": 6, "merge": "reference", "version": 2,
           "source_model": "x", "method": "swm"}
    (tmp_path / "p.json").write_text(json.dumps(old))
    plan = Plan.load(tmp_path / "p.json")
    assert not plan.compensated and plan.tensors == {} and plan.version == 2


def test_grid_rows_per_compensation(tmp_path, tiny_llama_dir, tokens_parquet, text_jsonl):
    from swm_ray.io.data import calibration_for
    from swm_ray.recipes.specs import method_label
    from swm_ray.recipes.trial import run_trial

    cfg = build_config(flags={"model.source": str(tiny_llama_dir), "data.source": str(tokens_parquet),
                              "data.samples": 8, "data.seq_len": 16, "data.batch_size": 4, "grid.layers": [2],
                              "grid.baselines": ["replaceme"], "grid.compensate": ["none", "lstsq", "scale"],
                              "eval.tasks": [], "eval.ppl_data": str(text_jsonl), "eval.ppl_chunk": 16,
                              "eval.ppl_bos": "none"})
    _, calib, _ = calibration_for(cfg)
    rows: list[dict] = []
    run_trial({"model": str(tiny_llama_dir), "method": "replaceme"}, cfg, str(tiny_llama_dir), calib, None,
              rows.append)
    assert [r["compensate"] for r in rows] == ["none", "lstsq", "scale"]
    assert [method_label(r) for r in rows] == ["replaceme", "replaceme + lstsq", "replaceme + scale"]
    assert len({r["ppl"] for r in rows}) == 3 and len({r["windows"] for r in rows}) == 1
    assert json.loads(rows[1]["plan"])["compensation"]["method"] == "lstsq"
    assert json.loads(rows[0]["plan"])["compensation"] is None
    from swm_ray.recipes.results import finalize_rows, write_results

    files = write_results(tmp_path, finalize_rows(rows))
    sides = [f for f in files if f.endswith(".tensors")]
    assert len(sides) == 2 and "plan_tensors" not in (tmp_path / "results.csv").read_text()
    plan = Plan.load(tmp_path / sides[0].replace(".tensors", ".json"))
    assert plan.compensated and set(plan.tensors) == {f"compensation.{a}-{b}" for a, b in plan.windows}


def _aware_cfg(**flags):
    return build_config(flags={"select.method": "swm", "select.search": "best-first", "merge.compensate": "lstsq",
                               "select.compensate_aware": True, **flags})


def test_compensation_aware_step_picks_the_window_of_lowest_compensated_loss(tmp_path):
    """One best-first step under `select.compensate_aware` commits the pair whose compensated model has the
    lowest calibration NLL: every pair fitted and scored by hand here (fit_windows, then the compensated
    model's own loss), and the chosen window's score is that loss."""
    from swm_ray.compute.validation import mean_nll, plan_nll
    from swm_ray.io.data import Calibration
    from swm_ray.methods.planners import plan_windows
    from swm_ray.methods.session import LocalScoring

    model = _saved("llama", tmp_path, n_layers=6)
    stack = InMemoryStack(model)
    calib = Calibration(IDS, BATCHES, bos_prepended=False, pretokenized=True, source="test")

    def loss(windows, merge, fits):
        return mean_nll(plan_nll(stack, IDS, BATCHES, windows, merge, "global", fits))

    by_hand = {}
    for low in range(0, 4):  # the pairs (low, low + 1) that keep the last layer (protect_last)
        fits = _fits(stack, [(low, low + 1)])
        by_hand[(low, low + 1)] = loss([(low, low + 1)], "reference", fits)
    best = min(by_hand, key=lambda w: (by_hand[w], w))
    planned = plan_windows(_aware_cfg(**{"select.layers": 1}), LocalScoring(stack, calib), 6, 1)
    assert planned.selection.windows == [best]
    assert planned.selection.scores[0] == pytest.approx(by_hand[best], rel=1e-9)
    assert planned.criterion == "nll after lstsq" and planned.evaluator.misses == len(by_hand)
    # the plain search scores the same pairs without a fit: a different number for the same window
    plain = LocalScoring(stack, calib).evaluator("nll", "reference").score([(i, i) for i in range(6)], [best])[0]
    assert plain != pytest.approx(by_hand[best], rel=1e-6)


def test_compensation_aware_refits_every_window_of_the_candidate_plan(tmp_path):
    """A second step scores plans of two windows: each candidate's loss equals the loss of its two windows
    fitted bottom-up together (the window below changes the input of the one above)."""
    from swm_ray.compute.validation import mean_nll, plan_nll
    from swm_ray.io.data import Calibration
    from swm_ray.methods.planners import plan_windows, windows_with
    from swm_ray.methods.session import LocalScoring

    model = _saved("llama", tmp_path, n_layers=6)
    stack = InMemoryStack(model)
    calib = Calibration(IDS, BATCHES, bos_prepended=False, pretokenized=True, source="test")
    planned = plan_windows(_aware_cfg(**{"select.layers": 2}), LocalScoring(stack, calib), 6, 2)
    windows = planned.selection.windows
    assert sum(h - lo for lo, h in windows) == 2
    ws = sorted(tuple(w) for w in windows)
    want = mean_nll(plan_nll(stack, IDS, BATCHES, ws, "reference", "global", _fits(stack, ws)))
    assert planned.selection.scores[-1] == pytest.approx(want, rel=1e-9)
    # fits of windows below a candidate are reused: fewer fits than windows in all the plans checked
    checked = sum(len(windows_with(groups, cand)) for groups, cand in planned.evaluator.cache)
    assert 0 < planned.evaluator.inner.fits_computed < checked
    assert windows_with([(0, 0), (1, 2), (3, 3), (4, 4)], (3, 4)) == [(1, 2), (3, 4)]
    assert windows_with([(0, 0), (1, 2), (3, 3)], (0, 2)) == [(0, 2)]


@pytest.mark.parametrize("flags, match", [
    ({"merge.compensate": "none"}, "give --compensate lstsq or scale"),
    ({"select.method": "shortgpt"}, "setting of --method swm"),
])
def test_compensation_aware_needs_swm_and_a_fit(flags, match):
    from swm_ray.methods.planners import check_method_target

    with pytest.raises(UserError, match=match) as e:
        check_method_target(_aware_cfg(**{"select.layers": 2, **flags}))
    assert "\n" not in str(e.value)


def test_compensation_aware_on_actors_equals_one_process(ray_session, tiny_llama_dir, tokens_parquet, tmp_path):
    """`compress --compensate-aware` through two actors picks the windows the in-process search picks, with
    the same scores (sums over rows added exactly), and records the criterion in plan.json."""
    from swm_ray.compute.stack import StackSpec, open_stack
    from swm_ray.io.data import calibration_for
    from swm_ray.jobs.compress import run_compress
    from swm_ray.methods.planners import plan_windows
    from swm_ray.methods.session import LocalScoring

    flags = {"model.source": str(tiny_llama_dir), "data.source": str(tokens_parquet), "data.samples": 8,
             "data.seq_len": 16, "data.batch_size": 4, "select.layers": 2}
    res = run_compress(_aware_cfg(**flags, **{"ray.actors": 2, "out": str(tmp_path / "c")}))
    cfg = _aware_cfg(**flags)
    path, calib, n_layers = calibration_for(cfg)
    stack = open_stack(StackSpec(path), rows=8, seq_len=16)
    here = plan_windows(cfg, LocalScoring(stack, calib), n_layers, 2)
    assert res["plan"]["windows"] == [list(w) for w in here.selection.windows]
    assert res["plan"]["similarities"] == pytest.approx(here.selection.scores, rel=1e-9)
    assert res["plan"]["criterion"] == "nll after lstsq" and res["plan"]["compensation"]["method"] == "lstsq"


@pytest.mark.parametrize("kind", ["matrix", "diagonal", "scalar"])
def test_the_ridge_pulls_the_map_towards_its_prior(tmp_path, kind):
    """λ = 0: both priors give the least-squares map. A huge λ gives back I (no correction) with the identity
    prior and 0 (the MLP output switched off) with the zero prior; between, the identity prior's map lies
    between the two and its calibration error is never below the plain fit's."""
    from swm_ray.methods.compensation import as_matrix, residual, solve

    stack = InMemoryStack(_saved("llama", tmp_path))
    (s,) = compensation_sums(stack, IDS, BATCHES, [[2, 4]], "reference", "global", {}, [(2, 4)])
    d = s.mtm.shape[0]
    plain = solve(s, kind, 0.0, "identity")
    np.testing.assert_allclose(plain, solve(s, kind, 0.0, "zero"), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(as_matrix(kind, solve(s, kind, 1e9, "identity"), d), np.eye(d), atol=1e-6)
    np.testing.assert_allclose(solve(s, kind, 1e9, "zero"), 0 * plain, atol=1e-6)
    mid = as_matrix(kind, solve(s, kind, 1.0, "identity"), d)
    assert residual(s, as_matrix(kind, plain, d)) <= residual(s, mid) + 1e-9 <= residual(s, np.eye(d)) + 1e-9
    with pytest.raises(UserError, match="ridge_prior"):
        solve(s, kind, 1.0, "one")


def test_the_fit_sums_over_its_own_rows(tmp_path):
    """`fit_calib`: the planners score on the first rows, the fit sums over all of them; the fits equal those of
    a run whose only rows are the fit's, and a compress run records the fit's token count."""
    from swm_ray.io.data import Calibration
    from swm_ray.methods.planners import compensate_plan
    from swm_ray.methods.session import LocalScoring
    from swm_ray.recipes.pipeline import compress_here

    stack = InMemoryStack(_saved("qwen2", tmp_path / "m"))
    few = Calibration(IDS[:4], [(0, 4)], False, True, "t")
    every = Calibration(IDS, BATCHES, False, True, "t")
    cfg = build_config(flags={"merge.ridge": 0.5})
    windows = [(1, 2), (3, 5)]
    both = compensate_plan(cfg, LocalScoring(stack, few, fit_calib=every), windows, "reference",
                           stack_site(stack), "lstsq")
    alone = compensate_plan(cfg, LocalScoring(stack, every), windows, "reference", stack_site(stack), "lstsq")
    small = compensate_plan(cfg, LocalScoring(stack, few), windows, "reference", stack_site(stack), "lstsq")
    for w in windows:
        torch.testing.assert_close(both.fits[w].tensor, alone.fits[w].tensor, rtol=0, atol=0)
        assert both.fits[w].tokens == 8 * 11 and small.fits[w].tokens == 4 * 11
        assert not torch.allclose(both.fits[w].tensor, small.fits[w].tensor)

    def run(fit_samples, out):
        flags = {"model.source": str(tmp_path / "m"), "data.source": str(tmp_path / "t.parquet"),
                 "data.samples": 8, "data.seq_len": 16, "data.batch_size": 4, "select.layers": 2,
                 "select.method": "replaceme", "merge.fit_samples": fit_samples, "out": str(tmp_path / out)}
        return compress_here(build_config(flags=flags))["plan"]

    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"input_ids": [list(map(int, r)) for r in np.random.default_rng(9).integers(
        4, 256, size=(40, 16))]}), tmp_path / "t.parquet")
    wide, narrow, short = run(24, "wide"), run(8, "narrow"), run(128, "short")  # the text has 40 rows
    assert wide["windows"] == narrow["windows"] == short["windows"]  # the same planning rows choose the block
    assert wide["extra"]["calibration"]["samples"] == narrow["extra"]["calibration"]["samples"] == 8
    assert [w["tokens"] for w in wide["compensation"]["windows"]] == [24 * 15]
    assert wide["extra"]["calibration"]["fit_samples"] == 24 and wide["extra"]["calibration"]["fit_note"] is None
    assert [w["tokens"] for w in narrow["compensation"]["windows"]] == [8 * 15]
    assert [w["tokens"] for w in short["compensation"]["windows"]] == [8 * 15]  # too few rows: the planning rows
    assert "too few rows" in short["extra"]["calibration"]["fit_note"]
    assert wide["compensation"]["ridge_prior"] == "identity"


def test_fit_rows_beyond_the_planning_rows_on_actors_equal_one_process(ray_session, tiny_llama_dir,
                                                                       tokens_parquet, tmp_path):
    """compress on 2 actors: the planners see 16 rows, the fit 24 (split over the actors like the rest); the
    plan and its fitted maps equal the in-process run's."""
    from swm_ray.jobs.compress import run_compress
    from swm_ray.recipes.pipeline import compress_here

    flags = {"model.source": str(tiny_llama_dir), "data.source": str(tokens_parquet), "data.samples": 16,
             "data.seq_len": 16, "data.batch_size": 4, "select.layers": 2, "select.method": "shortgpt",
             "merge.compensate": "lstsq", "merge.fit_samples": 24}
    on_actors = run_compress(build_config(flags={**flags, "ray.actors": 2, "out": str(tmp_path / "r")}))["plan"]
    here = compress_here(build_config(flags={**flags, "out": str(tmp_path / "h")}))["plan"]
    assert on_actors["windows"] == here["windows"]
    assert on_actors["extra"]["calibration"]["fit_samples"] == 24
    assert [w["tokens"] for w in on_actors["compensation"]["windows"]] == [24 * 15] * len(here["windows"])
    a, b = Plan.load(tmp_path / "r" / "plan.json"), Plan.load(tmp_path / "h" / "plan.json")
    for name, t in a.tensors.items():
        torch.testing.assert_close(t, b.tensors[name], rtol=1e-5, atol=1e-6)


def test_compensation_aware_top_down_reaches_its_layer_target(tmp_path):
    """Top-down to a layer count searches thresholds on the scale the compensation-aware evaluator scores in
    (calibration NLL, nats), not the output criterion's 0..1, which no compensated loss passes."""
    from swm_ray.io.data import Calibration
    from swm_ray.methods.planners import plan_windows
    from swm_ray.methods.session import LocalScoring

    stack = InMemoryStack(_saved("llama", tmp_path, n_layers=6))
    calib = Calibration(IDS, BATCHES, bos_prepended=False, pretokenized=True, source="test")
    cfg = _aware_cfg(**{"select.search": "top-down", "select.layers": 1, "select.paper_loop": False})
    assert cfg.select.criterion == "output"
    sel = plan_windows(cfg, LocalScoring(stack, calib), 6, 1).selection
    assert sum(h - lo for lo, h in sel.windows) == 1, sel.note
    assert sel.threshold > 1.0 and min(sel.scores) > 1.0  # losses in nats, above the output criterion's range


def test_auto_refuses_a_compensation_it_would_not_fit():
    """--compensate is one method's setting; under --method auto it was accepted and ignored."""
    from swm_ray.methods.planners import check_method_target

    with pytest.raises(UserError, match="select.auto_compensate"):
        check_method_target(build_config(flags={"select.layers": 2, "merge.compensate": "lstsq"}))
    check_method_target(build_config(flags={"select.layers": 2, "select.auto_compensate": ["none", "lstsq"]}))
    check_method_target(build_config(flags={"select.layers": 2, "select.method": "swm", "merge.compensate": "lstsq"}))


def _last_token_dists(hs, n):
    last = [h[:, -1, :].double() for h in hs[:8]]
    return {s: float((torch.arccos(torch.nn.functional.cosine_similarity(last[s], last[s + n], dim=-1)
                                   .clamp(-1, 1)) / np.pi).mean()) for s in range(1, 8 - n)}


def test_a_reference_pass_at_the_last_token_does_not_cover_angular_distances_over_all_tokens():
    from swm_ray.compute.refpass import Needs

    last, every = Needs(angular=True), Needs(angular=True, angular_tokens="all")
    assert not last.covers(every) and not every.covers(last) and every.covers(Needs(influence=False))
    assert (Needs(hsic=True) | every).angular_tokens == "all" and (every | Needs(hsic=True)).angular_tokens == "all"
    assert (every | Needs(influence=True)).covers(every) and Needs(influence=True).covers(Needs())


def test_angles_over_every_token_read_at_most_128_positions_per_row_evenly_spaced():
    from swm_ray.compute.refpass import ANGULAR_POSITIONS, angular_positions

    assert angular_positions(12).tolist() == list(range(1, 12))  # every position but the first
    assert angular_positions(129).tolist() == list(range(1, 129))  # the default rows: 127 of them, all
    long = angular_positions(2048).tolist()
    assert len(long) == len(set(long)) == ANGULAR_POSITIONS == 128 and long[0] == 1 and long[-1] == 2047
    gaps = np.diff(long)
    assert gaps.min() >= 15 and gaps.max() <= 17  # evenly spaced: 2046 / 127 ≈ 16.1
