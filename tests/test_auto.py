"""`--method auto`: the race between candidate planners.

Every check here can fail: auto's choice is compared with the argmin of validation losses computed
independently (each planner run alone, its plan applied to a deep copy of the model, the NLL computed from
transformers' own logits); a candidate of the wrong size is left out; duplicates are found by what they compute;
the result does not depend on the order candidates are listed in; shared checks cost fewer candidate models than
the planners run one after the other; the actors give the same race as one process."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tiny_models import ARCHS, tiny_model

from swm_ray.compute.stack import InMemoryStack
from swm_ray.compute.validation import mean_nll, plan_nll
from swm_ray.config import build_config
from swm_ray.edits.fold import compensate_model, stack_site
from swm_ray.edits.merge import apply_windows
from swm_ray.errors import UserError
from swm_ray.io.data import Calibration, split_calibration
from swm_ray.methods.auto import STOP_RULES, run_auto
from swm_ray.methods.candidates import compensation_config, deduplicated, effective_spec
from swm_ray.methods.planners import compensate_plan, method_needs, plan_windows
from swm_ray.methods.session import LocalScoring, split_validation

RNG = np.random.default_rng(11)
IDS = RNG.integers(4, 256, size=(44, 12))


def _calibs():
    """12 planning rows, 8 held-out rows, 24 further held-out rows (close calls)."""
    calib = Calibration(IDS, [(0, 4), (4, 8), (8, 12)], False, True, "test")
    plan, val, fit = split_calibration(calib, 12, 32, 4)
    assert fit is plan  # no rows beyond the validation rows: the fit uses the planning rows
    return plan, *split_validation(val, 8, 4)


def _scoring(model, **kw):
    plan, val, extra = _calibs()
    return LocalScoring(InMemoryStack(model), plan, validation=val, extra=extra, **kw)


def _nll_by_hand(model, ids: np.ndarray) -> float:
    with torch.no_grad():
        logits = model(torch.tensor(ids)).logits.float()
    logp = F.log_softmax(logits, dim=-1)
    t = torch.tensor(ids)
    return float(-logp[:, :-1].gather(-1, t[:, 1:, None]).squeeze(-1).double().mean())


def _auto_cfg(**flags):
    return build_config(flags={"select.method": "auto", "select.layers": 2, "merge.skip_first": 0, **flags})


def test_split_keeps_the_planning_rows_and_holds_out_the_rest():
    plan, val, extra = _calibs()
    assert np.array_equal(plan.input_ids, IDS[:12]) and plan.batches == [(0, 4), (4, 8), (8, 12)]
    assert np.array_equal(val.input_ids, IDS[12:20]) and val.batches == [(0, 4), (4, 8)]
    assert np.array_equal(extra.input_ids, IDS[20:44]) and len(extra.batches) == 6
    with pytest.raises(UserError, match="holds out"):
        split_calibration(Calibration(IDS[:12], [(0, 4)], False, True, "t"), 12, 4, 4)


def test_split_gives_the_fit_the_planning_rows_and_the_rows_after_the_validation_rows():
    """[planning | validation | more fit rows]: the fit sees the planning rows and the further rows, never a
    validation row; without validation the fit is the first rows of the draw."""
    calib = Calibration(IDS[:20], [(0, 4)], False, True, "test")
    plan, val, fit = split_calibration(calib, 8, 4, 4)
    assert np.array_equal(plan.input_ids, IDS[:8]) and np.array_equal(val.input_ids, IDS[8:12])
    assert np.array_equal(fit.input_ids, np.concatenate([IDS[:8], IDS[12:20]]))
    assert fit.batches == [(0, 4), (4, 8), (8, 12), (12, 16)]
    plan, val, fit = split_calibration(calib, 8, 0, 4)
    assert val is None and np.array_equal(fit.input_ids, IDS[:20]) and plan.batches == [(0, 4), (4, 8)]


@pytest.mark.parametrize("arch", ARCHS)
def test_plan_nll_is_the_compressed_models_own_loss(arch):
    """plan_nll (layer stack, merged windows, fits folded; from the cached inputs of the reference pass or from
    the embeddings) equals the NLL of the model that apply_windows and compensate_model build, by hand."""
    model, _ = tiny_model(arch, n_layers=6)
    _, val, _ = _calibs()
    windows, merge = [(1, 2), (3, 5)], "reference"
    scoring = _scoring(model)
    stack = scoring.stack
    cfg = build_config(flags={"merge.skip_first": 0})
    comp = compensate_plan(cfg, scoring, windows, merge, stack_site(stack), "scale")
    got = mean_nll(plan_nll(stack, val.input_ids, val.batches, windows, merge, "global", comp.fits))
    (cached,) = scoring.validate([(windows, merge, comp.fits)])
    plain = mean_nll(plan_nll(stack, val.input_ids, val.batches, [], merge, "global"))
    assert plain == pytest.approx(_nll_by_hand(model, val.input_ids), abs=1e-5)
    assert scoring.original_validation().mean == pytest.approx(plain, abs=1e-6)
    edited, _ = tiny_model(arch, n_layers=6)
    apply_windows(edited, windows, merge)
    compensate_model(edited, windows, comp.fits)
    assert got == pytest.approx(_nll_by_hand(edited, val.input_ids), abs=1e-5)
    assert cached.mean == pytest.approx(got, abs=1e-6)
    assert got != pytest.approx(plain, abs=1e-4)  # the plan changed the model


AUTO_REPLACEME_TOKENS = build_config(flags={}).select.auto_replaceme_tokens


def _independent_models(model, specs, compensations, n_remove: int = 2):
    """Each candidate planned alone on a fresh scoring of the planning rows and its plan (fitted) applied to a deep
    copy of the model: no code of the race involved. name -> (edited model, windows)."""
    plan_calib, _, _ = _calibs()
    out = {}
    for spec in specs:
        method, _, merge = spec.partition("/")
        one = build_config(flags={"select.method": method, "select.layers": n_remove, "merge.skip_first": 0,
                                  "select.replaceme_tokens": AUTO_REPLACEME_TOKENS,  # as auto's candidates read
                                  **({"merge.method": merge} if merge else {})})
        fresh = LocalScoring(InMemoryStack(model), plan_calib)
        fresh.prepare(method_needs(one))
        planned = plan_windows(one, fresh, len(model.model.layers), n_remove)
        for c in compensations:
            method_c, cfg_c = compensation_config(one, c)
            comp = compensate_plan(cfg_c, fresh, planned.selection.windows, planned.merge,
                                   stack_site(fresh.stack), method_c) if method_c != "none" else None
            edited = copy.deepcopy(model)
            apply_windows(edited, planned.selection.windows, planned.merge)
            if comp is not None:
                compensate_model(edited, planned.selection.windows, comp.fits)
            out[spec if c == "none" else f"{spec}+{c}"] = (edited, [list(w) for w in planned.selection.windows])
    return out


def _independent_losses(model, specs, compensations, n_remove: int = 2):
    """`_independent_models`' held-out losses, computed from transformers' logits."""
    val = _calibs()[1]
    return {name: (_nll_by_hand(edited, val.input_ids), windows)
            for name, (edited, windows) in _independent_models(model, specs, compensations, n_remove).items()}


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_auto_chooses_the_argmin_of_independently_computed_losses(arch):
    """With the race's stopping rule off (a margin no difference reaches) every candidate finishes: each one's
    windows and held-out loss equal its independent computation, and auto chooses their argmin."""
    model, _ = tiny_model(arch, n_layers=6, seed=3)
    specs = ["swm", "swm/keep-first", "shortgpt", "sleb", "replaceme"]
    comps = ["none", "scale"]
    cfg = _auto_cfg(**{"select.auto_candidates": specs, "select.auto_compensate": comps,
                       "select.auto_margin": 1e9, "select.auto_validation_max": 8})
    res = run_auto(cfg, _scoring(model), 6, 2, layer_names=list(model.model.layers[0].state_dict()))
    want = _independent_losses(model, specs, comps)
    record = {o["candidate"]: o for o in res.record()["candidates"]}
    assert record.keys() == want.keys()
    for name, (loss, windows) in want.items():
        assert record[name]["windows"] == windows
        assert record[name]["validation_nll"] == pytest.approx(loss, abs=2e-5)
    ranked = sorted(want, key=lambda n: (want[n][0], n))
    distinct = [n for n in ranked if want[n][1] != want[ranked[0]][1] or n == ranked[0]]
    assert len(distinct) > 1  # the candidates differ: the choice could go wrong
    assert want[res.chosen.name][0] == pytest.approx(want[ranked[0]][0], abs=1e-9)
    assert res.record()["chosen"] == res.chosen.name


def test_a_candidate_with_its_own_fit_is_its_planners_plan_fitted():
    """`replaceme+lstsq` is ReplaceMe's plan with its map: one more finished plan beside the plain one, equal to
    its independent computation; a planner listed only with a fit (`shortgpt+scale`) runs, and only its fitted
    plan is a contender; a fit named by both lists is scored once."""
    model, _ = tiny_model("llama", n_layers=6, seed=3)
    specs = ["sleb", "replaceme", "replaceme+lstsq", "shortgpt+scale"]
    cfg = _auto_cfg(**{"select.auto_candidates": specs, "select.auto_compensate": ["none", "scale"],
                       "select.auto_margin": 1e9, "select.auto_validation_max": 8})
    res = run_auto(cfg, _scoring(model), 6, 2, layer_names=list(model.model.layers[0].state_dict()))
    want = {**_independent_losses(model, ["sleb", "replaceme"], ["none", "scale"]),
            **_independent_losses(model, ["replaceme"], ["lstsq"]),
            **_independent_losses(model, ["shortgpt"], ["scale"])}
    record = {o["candidate"]: o for o in res.record()["candidates"]}
    assert sorted(record) == sorted(want) == ["replaceme", "replaceme+lstsq", "replaceme+scale", "shortgpt+scale",
                                              "sleb", "sleb+scale"]
    for name, (loss, windows) in want.items():
        assert record[name]["windows"] == windows
        assert record[name]["validation_nll"] == pytest.approx(loss, abs=2e-5)
    assert record["replaceme+lstsq"]["compensate"] == "lstsq"
    assert record["replaceme+lstsq"]["validation_nll"] != pytest.approx(record["replaceme"]["validation_nll"])
    assert want[res.chosen.name][0] == pytest.approx(min(v[0] for v in want.values()), abs=1e-9)


def test_two_planners_with_the_same_plan_share_its_fit_and_its_further_rows(monkeypatch):
    """SLEB and swm/keep-first often end at the same plan: with a compensation listed, that plan is fitted once
    (the twin reuses the map and its held-out losses, equal to an independent fit), and in a close call the same
    model draws the further held-out rows once."""
    import swm_ray.methods.compensation as compensation

    model, _ = tiny_model("llama", n_layers=8, seed=2)
    fits, further = [], []
    real_fit = compensation.fit_plan
    monkeypatch.setattr(compensation, "fit_plan", lambda *a, **k: fits.append(a[1]) or real_fit(*a, **k))
    scoring = _scoring(model)
    real_validate = scoring.validate

    def validate(plans, extra=False):
        if extra:
            further.extend(sorted(tuple(w) for w in p[0]) + [p[2] is not None] for p in plans)
        return real_validate(plans, extra=extra)

    scoring.validate = validate
    cfg = _auto_cfg(**{"select.auto_candidates": ["swm/keep-first", "sleb"], "select.auto_compensate":
                       ["none", "lstsq"], "select.auto_margin": 1e9, "select.layers": 1})
    res = run_auto(cfg, scoring, 8, 1, layer_names=list(model.model.layers[0].state_dict()))
    by = {o.name: o for o in res.outcomes}
    assert by["sleb"].windows == by["swm/keep-first"].windows == [(5, 6)]  # the same plan: the case under test
    assert fits == ["lstsq"]  # one fit for both planners
    want = _independent_losses(model, ["sleb"], ["lstsq"], n_remove=1)["sleb+lstsq"][0]
    for name in ("sleb+lstsq", "swm/keep-first+lstsq"):
        assert float(np.mean(by[name].losses.values[:8])) == pytest.approx(want, abs=2e-5)
    assert len(further) == len({tuple(map(str, f)) for f in further}) == 2  # the plain and the fitted model once
    for a, b in (("sleb", "swm/keep-first"), ("sleb+lstsq", "swm/keep-first+lstsq")):  # each twin on every row
        assert len(by[a].losses.values) == len(by[b].losses.values) > 8
        np.testing.assert_array_equal(by[a].losses.values, by[b].losses.values)


@pytest.mark.parametrize("keep", [True, False])
def test_the_fits_of_several_plans_share_one_climb_up_the_original_model(keep, monkeypatch):
    """auto fits every finished plan: below its lowest window a plan is the original model, so one climb runs
    those layers once for all plans and each fit forks from it; above, the climb keeps the original's layer outputs
    for every fork. The fits equal a pass per plan bit for bit. Layer runs over the fit rows, plans with lowest
    windows 2, 3, 5 and tops 7, 6, 7: alone, each runs the original from the embeddings to its top (both models
    share the layers below its first window) = (2 + 6) + (3 + 4) + (5 + 3); shared, the original runs once from the
    embeddings to the highest top, 8, when its outputs are kept (a saving of 15 layers), and without room to keep
    them each fork runs it again above its window: 5 + 13 (a saving of 5). The compressed model's runs are the
    same either way."""
    from swm_ray.compute import fitpass
    from swm_ray.methods.auto import _fit_key, _fit_plans

    if not keep:
        monkeypatch.setattr(fitpass, "TRACK_LIMIT", 0)
    model, _ = tiny_model("llama", n_layers=8, seed=2)
    cfg = build_config(flags={"merge.skip_first": 0})
    plans = [([(5, 7)], "keep-first"), ([(2, 4), (6, 7)], "reference"), ([(3, 6)], "keep-first")]
    plan, val, extra = _calibs()
    stack = InMemoryStack(model)
    scoring = LocalScoring(stack, plan, validation=val, extra=extra)
    jobs = {_fit_key(w, m, "lstsq", cfg): (f"p{i}", cfg, "lstsq", w, m) for i, (w, m) in enumerate(plans)}
    runs0 = stack.token_runs
    made = _fit_plans(scoring, jobs)
    shared = stack.token_runs - runs0
    alone = 0
    for key, (_, c, method, windows, merge) in jobs.items():
        runs0 = stack.token_runs
        own = compensate_plan(c, scoring, windows, merge, scoring.site_for(), method)
        alone += stack.token_runs - runs0
        assert sorted(own.fits) == sorted(made[key].fits) == sorted(windows)
        for w in windows:
            assert torch.equal(own.fits[w].tensor, made[key].fits[w].tensor)
    assert alone - shared == (15 if keep else 5) * plan.input_ids.size


@pytest.mark.parametrize("further", [0, 12])
def test_the_fit_gate_checks_a_fitted_plan_on_the_task_items_text_computed_by_hand(further):
    """With task items given, a fitted plan that wins on held-out loss is checked on the task items' text against
    the plan without a fit: the gate's paired difference equals the one computed from transformers' logits on the
    fitted and plain models, and the choice follows it. With further items and a band wide enough to read them
    (`select.auto_gate_band`), the difference is the one on all the items."""
    from swm_ray.methods.tasksignal import ChoiceItem, task_rows, text_losses

    model, _ = tiny_model("llama", n_layers=6, seed=3)
    rng = np.random.default_rng(5)
    items = [ChoiceItem("piqa", i, (tuple(rng.integers(4, 256, 6).tolist()),) * 2,
                        tuple(tuple(rng.integers(4, 256, int(rng.integers(1, 4))).tolist()) for _ in range(2)),
                        int(rng.integers(0, 2)), (1.0, 1.0), (3, 5)) for i in range(24 + further)]
    tasks = task_rows(items[:24], items[24:])
    cfg = _auto_cfg(**{"select.auto_candidates": ["replaceme", "replaceme+lstsq"],
                       "select.auto_validation_max": 8, "select.auto_gate_band": 100.0})
    res = run_auto(cfg, _scoring(model), 6, 2, layer_names=list(model.model.layers[0].state_dict()), tasks=tasks)
    fitted = next(o for o in res.outcomes if o.name == "replaceme+lstsq")
    assert fitted.losses.mean < next(o for o in res.outcomes if o.name == "replaceme").losses.mean
    assert fitted.gate is not None and fitted.gate["versus"] == "replaceme" and fitted.gate["items"] == 24 + further
    assert ("first_items" in fitted.gate) is bool(further)

    def by_hand(edited):
        lls = []
        for ids, (a, b) in zip(task_rows(items).rows, task_rows(items).spans):
            with torch.no_grad():
                logp = F.log_softmax(edited(torch.tensor([ids])).logits[0].float(), dim=-1)
            lls.append(float(logp[a - 1 : b - 1].gather(-1, torch.tensor(ids[a:b])[:, None]).sum()))
        return text_losses(task_rows(items), lls)

    models = _independent_models(model, ["replaceme"], ["none", "lstsq"])
    d = by_hand(models["replaceme+lstsq"][0]) - by_hand(models["replaceme"][0])
    if further:
        first = d[:24]
        assert fitted.gate["first_items"]["text_loss_diff"] == pytest.approx(first.mean(), abs=1e-4)
        assert fitted.gate["first_items"]["items"] == 24
    assert fitted.gate["text_loss_diff"] == pytest.approx(d.mean(), abs=1e-4)
    assert fitted.gate["se"] == pytest.approx(d.std(ddof=1) / math.sqrt(len(d)), abs=1e-4)
    passed = d.mean() <= 2.0 * d.std(ddof=1) / math.sqrt(len(d))
    assert fitted.gate["passed"] is bool(passed)
    assert (res.chosen.name == "replaceme+lstsq") is bool(passed)
    assert ("fit gate passed" if passed else "replaceme+lstsq set aside") in res.decided


def test_a_fit_after_the_plan_is_named_by_the_planner_and_checked_before_any_model():
    names = dict(tiny_model("llama", n_layers=2)[0].model.layers[0].state_dict())
    assert effective_spec("swm/consistent+lstsq", "reference", names) == "swm/reference+lstsq"
    run, skipped = deduplicated(["swm+lstsq", "swm/reference+lstsq", "swm"], "reference", names)
    assert run == ["swm", "swm+lstsq"] and skipped == {"swm/reference+lstsq": "swm+lstsq"}
    for bad, why in [("sleb+none", "after '\\+' comes a compensation"), ("sleb+ridge", "comes a compensation"),
                     ("sleb+lstsq:-1", "comes a compensation"), ("sleb+scale:1", "comes a compensation"),
                     ("nope+lstsq", "not a method auto can run")]:
        with pytest.raises(UserError, match=why):
            build_config(flags={"select.auto_candidates": ["sleb", bad]})


def test_a_candidate_of_another_size_is_left_out_and_none_reaching_it_is_one_line():
    """LaCo with 4-layer windows cannot remove exactly 2 layers of 6: it is reported and excluded; with LaCo
    alone the error names the closest it came."""
    model, _ = tiny_model("llama", n_layers=6, seed=3)
    cfg = _auto_cfg(**{"select.auto_candidates": ["laco", "shortgpt"], "select.laco_layers": 4})
    res = run_auto(cfg, _scoring(model), 6, 2)
    laco = next(o for o in res.outcomes if o.name == "laco")
    assert laco.error and "not the 2 asked" in laco.error and res.chosen.name == "shortgpt"
    assert sum(h - lo for lo, h in res.chosen.windows) == 2
    with pytest.raises(UserError, match="no candidate reached the target; closest: laco") as e:
        run_auto(_auto_cfg(**{"select.auto_candidates": ["laco"], "select.laco_layers": 4}), _scoring(model), 6, 2)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("arch,same", [("llama", True), ("qwen2", True), ("qwen3", False), ("gemma2", False)])
def test_duplicates_are_found_by_their_effective_merge(arch, same):
    names = dict(tiny_model(arch, n_layers=2)[0].model.layers[0].state_dict())
    assert (effective_spec("swm/consistent", "reference", names) == "swm/reference") == same
    assert effective_spec("swm", "reference", names) == effective_spec("swm/reference", "mean", names)
    # merge.method = mean: bare swm is swm/mean, a computation of its own; consistent equals reference where
    # no norm follows a weight, and of two equal ones the first by name runs
    specs = ["swm/reference", "swm/keep-first", "swm/consistent", "swm"]
    run, skipped = deduplicated(specs, "mean", names)
    if same:
        assert run == ["swm", "swm/consistent", "swm/keep-first"] and skipped == {"swm/reference": "swm/consistent"}
    else:
        assert run == sorted(specs) and skipped == {}
    run, skipped = deduplicated(specs, "reference", names)  # now bare swm is swm/reference
    assert skipped["swm/reference"] == "swm" and ("swm/consistent" in skipped) == same


def test_the_result_does_not_depend_on_the_order_of_candidates():
    model, _ = tiny_model("qwen3", n_layers=6, seed=5)
    specs = ["swm", "swm/keep-first", "shortgpt", "sleb", "replaceme"]
    records = []
    for order in (specs, list(reversed(specs)), specs[2:] + specs[:2]):
        res = run_auto(_auto_cfg(**{"select.auto_candidates": order}), _scoring(model), 6, 2)
        rec = res.record()
        records.append((rec["chosen"], rec["decided_by"], [(c["candidate"], c["windows"], c["validation_nll"],
                                                             c["stopped"]) for c in rec["candidates"]]))
    assert records[0] == records[1] == records[2]


def test_shared_checks_cost_fewer_candidate_models_than_the_planners_alone():
    """SLEB and swm/keep-first check the same keep-first models: run together (no stopping) they need fewer
    candidate models than run one after the other, and one reference pass."""
    model, _ = tiny_model("llama", n_layers=8, seed=2)
    specs = ["swm/keep-first", "sleb"]
    scoring = _scoring(model)
    res = run_auto(_auto_cfg(**{"select.auto_candidates": specs, "select.auto_margin": 1e9, "select.layers": 3}),
                   scoring, 8, 3)
    alone = 0
    plan_calib = _calibs()[0]
    for spec in specs:
        method, _, merge = spec.partition("/")
        one = build_config(flags={"select.method": method, "select.layers": 3,
                                  **({"merge.method": merge} if merge else {})})
        fresh = LocalScoring(InMemoryStack(model), plan_calib)
        plan_windows(one, fresh, 8, 3)
        alone += fresh.counters()["checks"]
    assert res.passes["reference_passes"] == 1
    assert res.passes["checks"] < alone


def test_a_stopped_candidate_was_resolvably_behind():
    """Whenever the race stops a candidate, its partial plan's held-out loss is behind the named rival's by more
    than the margin's standard errors; with an unreachable margin nothing stops."""
    model, _ = tiny_model("gemma2", n_layers=8, seed=0)
    specs = ["swm", "swm/keep-first", "sleb", "shortgpt", "replaceme"]
    res = run_auto(_auto_cfg(**{"select.auto_candidates": specs, "select.layers": 3, "select.auto_margin": 1.0,
                                "select.auto_stop_margin": 1.0}), _scoring(model), 8, 3)
    stopped = [o for o in res.outcomes if o.stopped]
    assert stopped, "no candidate stopped: the test cannot check the rule"
    for o in stopped:
        s = o.stopped
        assert s["diff"] > 1.0 * s["se"] and s["level"] < 3 and s["behind"] != o.name
        if o.method in ("swm", "sleb"):  # a search stopped at level >= 1 ran checks to get there: they are counted
            assert o.checks > 0, o.name
    assert sum(o.checks for o in res.outcomes) >= res.passes["checks"]
    res = run_auto(_auto_cfg(**{"select.auto_candidates": specs, "select.layers": 3, "select.auto_margin": 1e9,
                                "select.auto_stop_margin": None}), _scoring(model), 8, 3)  # null: auto_margin
    assert not any(o.stopped for o in res.outcomes)
    # the stopping margin apart from the final one: every search runs to the end, the end keeps its margin
    kept = run_auto(_auto_cfg(**{"select.auto_candidates": specs, "select.layers": 3, "select.auto_margin": 1.0,
                                 "select.auto_stop_margin": 1e9}), _scoring(model), 8, 3)
    assert not any(o.stopped for o in kept.outcomes)
    finished = {o.name for o in kept.outcomes if o.losses is not None}
    assert {o.name for o in stopped} <= finished
    assert "1e+09" not in kept.decided
    # the default stops only a search more than 3.5 standard errors behind, whatever the final margin
    default = run_auto(_auto_cfg(**{"select.auto_candidates": specs, "select.layers": 3, "select.auto_margin": 1.0}),
                       _scoring(model), 8, 3)
    assert all(o.stopped["diff"] > 3.5 * o.stopped["se"] for o in default.outcomes if o.stopped)
    assert {o.name for o in default.outcomes if o.stopped} < {o.name for o in stopped}


def _stop_rules_bench():
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "stop_rules.py"
    spec = importlib.util.spec_from_file_location("stop_rules", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_replay_of_a_run_without_stopping_makes_the_races_stops():
    """`extra.auto.trajectory` of a run where every search finishes, replayed under each stopping rule
    (`benchmarks/stop_rules.py`), stops the same searches at the same levels as the race run with that rule."""
    model, _ = tiny_model("gemma2", n_layers=8, seed=0)
    specs = ["swm", "swm/keep-first", "sleb", "shortgpt", "replaceme"]
    flags = {"select.auto_candidates": specs, "select.layers": 3, "select.auto_margin": 1.0,
             "select.auto_stop_margin": 1.0}
    kept = run_auto(_auto_cfg(**{**flags, "select.auto_stop_margin": 1e9}), _scoring(model), 8, 3).record()
    traj = kept["trajectory"]
    assert {"swm", "swm/keep-first", "sleb"} <= set(traj) and any("@" in n for n in traj)
    for n in ("swm", "sleb"):
        levels = [e["level"] for e in traj[n] if not e["finished"]]
        assert levels == sorted(levels) and len(set(levels)) == len(levels) and traj[n][-1]["finished"]
        assert all(len(e["rows"]) == 8 for e in traj[n])
    bench = _stop_rules_bench()
    stops = {}
    for rule in STOP_RULES:
        raced = run_auto(_auto_cfg(**flags, **{"select.auto_stop_rule": rule}), _scoring(model), 8, 3)
        stops[rule] = {o.name: o.stopped["level"] for o in raced.outcomes if o.stopped}
        replayed = bench.replay(kept, rule, 1.0, 3)
        assert {n: s["level"] for n, s in replayed["stopped"].items()} == stops[rule], rule
        assert replayed["checks"] <= bench.replay(kept, rule, math.inf, 3)["checks"]
    assert stops["partial"], "no search stopped: the test cannot check the replay"
    assert len(stops["finals"]) <= len(stops["partial"])


def test_a_close_call_is_decided_on_more_rows():
    model, _ = tiny_model("llama", n_layers=6, seed=3)
    cfg = _auto_cfg(**{"select.auto_candidates": ["shortgpt", "replaceme", "sleb"], "select.auto_margin": 1e9})
    res = run_auto(cfg, _scoring(model), 6, 2)
    rec = res.record()
    assert rec["decided_by"].startswith("close call") and "32 rows" in rec["decided_by"]
    chosen = next(c for c in rec["candidates"] if c["candidate"] == rec["chosen"])
    assert chosen["validation_rows"] == 32
    # what the race spent, by phase: the searches' checks and the further rows of the close call, adding up to
    # what the run counted (its reference pass included: it ran inside)
    spent = rec["passes"]["by_phase"]
    assert spent["searches: candidate checks"] > 0 and spent["close call: further held-out rows"] > 0
    assert sum(spent.values()) == pytest.approx(rec["passes"]["forward_passes"], abs=0.05)  # all of it, once
    # and the seconds of each phase, within the race's own
    secs = rec["passes"]["seconds_by_phase"]
    assert set(spent) <= set(secs) and all(v >= 0 for v in secs.values())
    assert 0 < sum(secs.values()) <= rec["seconds"] + 0.05


def test_after_a_close_call_the_chosen_and_the_original_are_compared_on_the_same_rows():
    model, _ = tiny_model("llama", n_layers=6, seed=3)
    cfg = _auto_cfg(**{"select.auto_candidates": ["shortgpt", "replaceme", "sleb"], "select.auto_margin": 1e9})
    sc = _scoring(model)
    res = run_auto(cfg, sc, 6, 2)
    rec = res.record()
    assert len(res.chosen.losses.values) == 32 and len(res.original.values) == 8
    # the chosen plan on the original's 8 rows, scored again independently of the race
    (again,) = sc.validate([(res.chosen.windows, res.chosen.merge, None)])
    assert rec["chosen_validation_nll_on_original_rows"] == pytest.approx(again.mean, abs=1e-6)
    assert again.mean != pytest.approx(res.chosen.val_nll, abs=1e-6)  # the 32 rows' mean is another number
    # the plan card lists every candidate's perplexity on those 8 rows, the rows of the original's number
    from swm_ray.plan.card import _auto_text
    from swm_ray.plan.plan import Plan

    plan = Plan(windows=[list(w) for w in res.chosen.windows], num_layers_before=6, merge=res.chosen.merge,
                method="auto", extra={"auto": rec})
    table = "".join(_auto_text(plan))
    assert f"| **{rec['chosen']}** (chosen) |" in table
    line = next(x for x in table.splitlines() if x.startswith(f"| **{rec['chosen']}**"))
    assert line.rstrip(" |").endswith(f"{math.exp(again.mean):.2f}")


def test_a_candidate_whose_held_out_loss_is_not_finite_is_never_chosen_and_stops_no_one():
    from types import SimpleNamespace

    from swm_ray.compute.validation import RowLosses
    from swm_ray.methods.auto import Outcome, _choose, stop_decision

    good = RowLosses(np.array([2.0, 2.1, 1.9, 2.05]))
    bad = RowLosses(np.array([np.nan, 5.0, 5.0, 5.0]))  # one row overflowed
    scoring = SimpleNamespace(backend=SimpleNamespace(extra_rows=0))
    for first, second in (("replaceme", "sleb"), ("sleb", "replaceme")):  # either place in the list
        outs = [Outcome(first, "x", "none", [(1, 2)], "keep-first", losses=bad),
                Outcome(second, "x", "none", [(2, 3)], "keep-first", losses=good)]
        best, _ = _choose(outs, scoring, 2.0, 8, lambda _m: None)
        assert best.name == second
    worse = RowLosses(good.values + 1.0)
    alone = stop_decision("partial", "swm", 1, worse, 3, {}, {"z": (good, 3)}, 3.5)
    assert alone is not None and alone["behind"] == "z"
    # a rival whose loss is NaN, sorted first, neither blocks that stop nor is named as the one ahead
    assert stop_decision("partial", "swm", 1, worse, 3, {}, {"a": (bad, 3), "z": (good, 3)}, 3.5) == alone


def test_with_a_width_pass_a_planner_listed_only_fitted_is_no_contender():
    """select.then_width takes no fitted map: `replaceme+lstsq` is left out, and plain ReplaceMe, not listed, does
    not come in in its place."""
    from swm_ray.methods.planners import check_method_target
    from swm_ray.methods.width_targets import check_width_settings

    model, _ = tiny_model("llama", n_layers=6, seed=3)
    cfg = _auto_cfg(**{"select.auto_candidates": ["swm/keep-first", "replaceme+lstsq"], "select.then_width": 0.1})
    res = run_auto(cfg, _scoring(model), 6, 2)
    assert [o.name for o in res.outcomes] == ["swm/keep-first"] and res.chosen.name == "swm/keep-first"
    only_fitted = _auto_cfg(**{"select.auto_candidates": ["replaceme+lstsq"], "select.then_width": 0.1})
    with pytest.raises(UserError, match="then_width takes no fitted map"):
        check_method_target(only_fitted)
    # fits listed in select.auto_compensate are left out the same way, not refused; with no plain entry, refused
    fitted_too = _auto_cfg(**{"select.auto_candidates": ["swm/keep-first"], "select.then_width": 0.1,
                              "select.auto_compensate": ["none", "lstsq"]})
    check_method_target(fitted_too)
    check_width_settings(fitted_too, fitted_too.select.width_method)
    res = run_auto(fitted_too, _scoring(model), 6, 2)
    assert [o.name for o in res.outcomes] == ["swm/keep-first"]
    with pytest.raises(UserError, match="then_width takes no fitted map.*none in select.auto_compensate"):
        check_method_target(_auto_cfg(**{"select.auto_compensate": ["lstsq"], "select.then_width": 0.1}))


@pytest.mark.parametrize("criterion", ["output", "nll"])
def test_each_candidate_records_the_checks_it_ran(criterion):
    """Under the `nll` criterion SLEB and `swm/keep-first` share one evaluator: each records its own checks all
    the same, those the race saw it ask for."""
    model, _ = tiny_model("llama", n_layers=8, seed=2)
    sc = _scoring(model)
    res = run_auto(_auto_cfg(**{"select.auto_candidates": ["swm/keep-first", "sleb"], "select.criterion": criterion,
                                "select.auto_stop_margin": 1e9, "select.layers": 3,
                                "select.auto_compensate": ["none"]}), sc, 8, 3)  # the plans, not their fits
    for o in res.outcomes:
        assert o.checks == res.trajectory[o.name][-1]["checks"] > 0
    # a check both asked for in one round ran once: it counts for each, and each says it was shared
    shared = sum(o.checks_shared for o in res.outcomes)
    assert shared > 0 and shared % 2 == 0 and all(o.checks_shared <= o.checks for o in res.outcomes)
    assert sc.memo.computed == sum(o.checks for o in res.outcomes) - shared // 2
    assert all(c["checks_shared"] == o.checks_shared for c, o in zip(res.record()["candidates"], res.outcomes))


def test_a_stopped_candidate_records_only_the_checks_that_ran():
    model, _ = tiny_model("gemma2", n_layers=8, seed=0)
    sc = _scoring(model)
    res = run_auto(_auto_cfg(**{"select.auto_candidates": ["swm", "swm/keep-first", "sleb", "shortgpt", "replaceme"],
                                "select.layers": 3, "select.auto_margin": 1.0, "select.auto_stop_margin": 1.0}),
                   sc, 8, 3)
    stopped = [o for o in res.outcomes if o.stopped]
    assert stopped
    for o in stopped:  # the checks it had asked for by the level where it stopped, not its last, dropped, question
        assert o.checks == res.trajectory[o.name][-1]["checks"]


def test_races_on_one_scoring_each_count_their_own_passes():
    """A grid trial races every target on one scoring (one reference pass, one memo): each target's
    `extra.auto.passes` is what its own race ran, the sum of its `by_phase`."""
    model, _ = tiny_model("llama", n_layers=6, seed=3)
    sc = _scoring(model)
    cands = {"select.auto_candidates": ["shortgpt", "sleb", "swm/keep-first"]}
    first = run_auto(_auto_cfg(**cands, **{"select.layers": 1}), sc, 6, 1).record()["passes"]
    second = run_auto(_auto_cfg(**cands), sc, 6, 2).record()["passes"]
    assert first["reference_passes"] == 1 and second["reference_passes"] == 0
    for p in (first, second):
        assert sum(p["by_phase"].values()) == pytest.approx(p["forward_passes"], abs=0.05)
    assert second["checks"] < sc.counters()["checks"] and second["forward_passes"] > 0


def test_auto_needs_a_size_not_a_threshold(tiny_llama_dir, tokens_parquet, tmp_path):
    from swm_ray.jobs.compress import run_compress

    cfg = build_config(flags={"model.source": str(tiny_llama_dir), "data.source": str(tokens_parquet),
                              "select.method": "auto", "select.threshold": 0.9, "out": str(tmp_path / "o")})
    with pytest.raises(UserError, match="give --layers or --ratio") as e:
        run_compress(cfg)
    assert "\n" not in str(e.value) and not (tmp_path / "o").exists()
    with pytest.raises(UserError, match="is not a candidate"):
        build_config(flags={"select.auto_candidates": ["shortgpt/mean"]})
    # a compensation is not a planner, and a planner is not a compensation: refused when the config is read
    for bad in (["none"], ["swm", "lstsq:0.5"], ["scale"]):
        with pytest.raises(UserError, match="is not a candidate.*auto_compensate"):
            build_config(flags={"select.auto_candidates": bad})
    for bad in (["swm"], ["lstsq:-1"], ["none", "keep-first"]):
        with pytest.raises(UserError, match="is not a compensation"):
            build_config(flags={"select.auto_compensate": bad})
    ok = build_config(flags={"select.auto_compensate": ["none", "lstsq:0.5", "scale"],
                             "select.auto_candidates": ["swm", "replaceme+lstsq:2"]})
    assert ok.select.auto_compensate == ("none", "lstsq:0.5", "scale")


def test_auto_on_actors_equals_one_process(ray_session, tiny_llama_dir, tokens_parquet, tmp_path):
    """`compress --method auto` with 2 actors and the in-process pipeline (zoo's path) race the same way: the
    same choice, losses, stops and checks; one reference pass each; the folder reloads with transformers."""
    from transformers import AutoModelForCausalLM

    from swm_ray.jobs.compress import run_compress
    from swm_ray.recipes.pipeline import compress_here

    flags = {"model.source": str(tiny_llama_dir), "data.source": str(tokens_parquet), "data.samples": 12,
             "data.seq_len": 16, "data.batch_size": 4, "select.method": "auto", "select.layers": 2,
             "select.auto_candidates": ["swm", "swm/keep-first", "shortgpt", "sleb"],
             "select.auto_compensate": ["none", "scale"], "select.auto_validation_max": 12}
    ray_res = run_compress(build_config(flags={**flags, "ray.actors": 2, "out": str(tmp_path / "ray")}))
    here = compress_here(build_config(flags={**flags, "out": str(tmp_path / "here")}))
    a, b = ray_res["plan"]["extra"]["auto"], here["plan"]["extra"]["auto"]
    assert a["chosen"] == b["chosen"] and a["validation_rows"] == 8 and a["decided_by"] == b["decided_by"]
    assert len(a["candidates"]) == len(b["candidates"])
    for x, y in zip(a["candidates"], b["candidates"]):
        assert x["candidate"] == y["candidate"] and x["windows"] == y["windows"] and x["stopped"] == y["stopped"]
        assert (x["validation_nll"] is None) == (y["validation_nll"] is None)
        if x["validation_nll"] is not None:
            assert x["validation_nll"] == pytest.approx(y["validation_nll"], abs=1e-9)
    for extra in (ray_res["plan"]["extra"], here["plan"]["extra"]):
        assert extra["passes"]["reference_passes"] == 1
    assert ray_res["plan"]["extra"]["passes"]["checks"] == here["plan"]["extra"]["passes"]["checks"]
    assert ray_res["plan"]["windows"] == here["plan"]["windows"] and ray_res["plan"]["method"] == "auto"
    plan = json.loads(Path(tmp_path / "ray" / "plan.json").read_text())
    assert plan["extra"]["auto"]["chosen"] == a["chosen"]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "ray")
    assert model.config.num_hidden_layers == 4


def test_auto_is_a_grid_row_with_its_plan(tiny_llama_dir, tokens_parquet, tmp_path):
    """`grid.baselines: [auto]`: one row per target, the chosen plan (and its compensation tensors) in the row,
    applicable with `apply` to the same folder that `compress --method auto` writes."""
    import base64

    from swm_ray.io.data import calibration_for
    from swm_ray.jobs.apply import run_apply
    from swm_ray.recipes.pipeline import compress_here
    from swm_ray.recipes.trial import run_trial

    flags = {"model.source": str(tiny_llama_dir), "data.source": str(tokens_parquet), "data.samples": 12,
             "data.seq_len": 16, "data.batch_size": 4, "eval.tasks": [], "eval.ppl_data": None,
             "select.auto_candidates": ["swm", "shortgpt"], "select.auto_compensate": ["none", "lstsq:1"],
             "select.auto_validation_max": 12}
    cfg = build_config(flags={**flags, "grid.layers": [1, 2], "grid.baselines": ["auto"]})
    _, calib, _ = calibration_for(cfg)
    rows: list[dict] = []
    run_trial({"model": str(tiny_llama_dir), "method": "auto"}, cfg, str(tiny_llama_dir), calib, None, rows.append)
    assert [r["status"] for r in rows] == ["ok", "ok"] and [r["removed_layers"] for r in rows] == [1, 2]
    row = rows[1]
    plan = json.loads(row["plan"])
    assert plan["method"] == "auto" and row["note"] == f"auto chose {plan['extra']['auto']['chosen']}"
    (tmp_path / "p.json").write_text(row["plan"])
    if row.get("plan_tensors"):
        (tmp_path / "p.tensors").write_bytes(base64.b64decode(row["plan_tensors"]))
    run_apply(build_config(flags={"out": str(tmp_path / "a")}), str(tmp_path / "p.json"))
    here = compress_here(build_config(flags={**flags, "select.method": "auto", "select.layers": 2,
                                             "out": str(tmp_path / "c")}))
    assert here["plan"]["windows"] == plan["windows"]
    assert math.isfinite(here["plan"]["extra"]["auto"]["original_validation_nll"])
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "c" / "model.safetensors").read_bytes()


def test_a_streamed_model_races_like_one_in_memory(tiny_llama_dir, tokens_parquet, tmp_path):
    """Layer streaming (no cached inputs: every check, partial plan and close call walks the layers from the
    checkpoint) gives the race of the model in memory, and counts its layer reads."""
    from swm_ray.recipes.pipeline import compress_here

    flags = {"model.source": str(tiny_llama_dir), "data.source": str(tokens_parquet), "data.samples": 12,
             "data.seq_len": 16, "data.batch_size": 4, "select.method": "auto", "select.layers": 2,
             "select.auto_candidates": ["swm", "sleb", "replaceme"], "select.auto_validation_max": 12,
             "select.auto_task_items": 0}
    mem = compress_here(build_config(flags={**flags, "model.stream": "never", "out": str(tmp_path / "m")}))["plan"]
    streamed = compress_here(build_config(flags={**flags, "model.stream": "always", "out": str(tmp_path / "s")}))
    a, b = mem["extra"]["auto"], streamed["plan"]["extra"]["auto"]
    assert a["chosen"] == b["chosen"] and a["decided_by"] == b["decided_by"]
    for x, y in zip(a["candidates"], b["candidates"]):
        assert x["windows"] == y["windows"] and x["stopped"] == y["stopped"]
        assert (x["validation_nll"] is None) == (y["validation_nll"] is None)
        if x["validation_nll"] is not None:
            assert x["validation_nll"] == pytest.approx(y["validation_nll"], abs=1e-5)
    assert mem["extra"]["passes"]["layer_reads"] is None and streamed["plan"]["extra"]["passes"]["layer_reads"] > 0


def test_auto_reads_replacemes_angles_over_every_token_and_replaceme_alone_at_the_last():
    """`select.auto_replaceme_tokens` (all) is what auto's ReplaceMe candidates read, declared before the one
    reference pass; `--method replaceme` stays as published (the last token)."""
    from swm_ray.methods.candidates import candidate_config

    cfg = build_config(flags={})
    assert cfg.select.method == "auto" and cfg.select.auto_replaceme_tokens == "all"
    assert candidate_config(cfg, "replaceme+lstsq").select.replaceme_tokens == "all"
    assert method_needs(cfg).angular and method_needs(cfg).angular_tokens == "all"
    alone = build_config(flags={"select.method": "replaceme"})
    assert method_needs(alone).angular_tokens == "last" == alone.select.replaceme_tokens
    last = build_config(flags={"select.auto_replaceme_tokens": "last"})
    assert method_needs(last).angular_tokens == "last"
