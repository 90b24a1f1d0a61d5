"""The task-style signal of `auto`: its items come from the held-out slice no reported accuracy reads, rows of
different lengths are scored as transformers scores each alone, accuracy is counted per item, and it decides
only between candidates the held-out loss cannot tell apart."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from tiny_models import tiny_model, tiny_tokenizer

from swm_ray.compute.planrun import PlanRunner
from swm_ray.compute.stack import InMemoryStack
from swm_ray.compute.validation import RowLosses, plan_logliks, plans_logliks
from swm_ray.methods.auto import Outcome, _by_task_signal, _choose, replay_close_call
from swm_ray.methods.tasksignal import (
    TASKS,
    ChoiceItem,
    accuracy,
    build_items,
    further_items,
    item_scores,
    task_rows,
    text_losses,
)


def test_items_come_from_the_held_out_slice_only(tmp_path):
    from swm_ray.evaluation.zeroshot import REPORTED_LIMIT, held_out_items, reported_items

    tok = tiny_tokenizer(tmp_path)
    items = build_items(tok, 30, seed=3)
    assert len(items) == 30 and {it.task for it in items} == set(TASKS)
    for it in items:
        assert it.doc in held_out_items(it.task) and it.doc not in reported_items(it.task, None)
        assert it.doc >= REPORTED_LIMIT
        assert len(it.contexts) == len(it.continuations) >= 2 and 0 <= it.label < len(it.contexts)
    assert [it.doc for it in build_items(tok, 30, seed=3)] == [it.doc for it in items]  # fixed for every model


def test_the_fit_gates_further_items_leave_the_first_draw_as_it_was_and_repeat_none_of_it(tmp_path):
    """The near-margin items of the fit gate: drawn from what the first draw left of each held-out slice, spread
    over the tasks as the first are, fixed per seed; the first draw does not change when they are drawn."""
    from swm_ray.evaluation.zeroshot import held_out_items

    tok = tiny_tokenizer(tmp_path)
    first = build_items(tok, 30, seed=3)
    more = further_items(tok, first, 60, seed=3)
    assert len(more) == 60 and [sum(it.task == t for it in more) for t in TASKS] == [20, 20, 20]
    assert not {(it.task, it.doc) for it in first} & {(it.task, it.doc) for it in more}
    assert all(it.doc in held_out_items(it.task) for it in more)
    assert [(it.task, it.doc) for it in further_items(tok, first, 60, seed=3)] == [(it.task, it.doc) for it in more]
    assert [it.doc for it in build_items(tok, 30, seed=3)] == [it.doc for it in first]
    assert [it.doc for it in further_items(tok, first, 60, seed=4)] != [it.doc for it in more]
    rows = task_rows(first, more)
    assert rows.n_items == 30 and rows.further.n_items == 60 and task_rows(first).further is None


def test_plan_logliks_of_padded_rows_equal_each_row_alone():
    model, _ = tiny_model("qwen2", n_layers=4)
    rng = np.random.default_rng(0)
    rows = [tuple(rng.integers(4, 256, size=n).tolist()) for n in (5, 9, 7, 12, 6)]
    spans = [(2, len(r)) for r in rows]
    got = plan_logliks(InMemoryStack(model), rows, spans, [], "reference", "global", batch_rows=3)
    for r, (a, b), g in zip(rows, spans, got):
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([r])).logits.float(), -1)[0]
        want = float(sum(logp[i - 1, r[i]] for i in range(a, b)))
        assert g == pytest.approx(want, abs=1e-4)


def test_plans_share_the_original_layers_below_their_windows_and_score_as_each_alone():
    """Several plans in one walk: each plan's values are exactly those of its own walk from the embeddings, and
    the layers below the lowest window run once for all of them."""
    model, _ = tiny_model("llama", n_layers=6, seed=1)
    stack = InMemoryStack(model)
    rng = np.random.default_rng(1)
    rows = [tuple(rng.integers(4, 256, size=n).tolist()) for n in (6, 8, 8, 11)]
    spans = [(3, len(r)) for r in rows]
    plans = [([(3, 4)], "reference", None), ([(1, 2), (4, 5)], "keep-first", None), ([], "reference", None)]
    stack.token_runs = 0
    got = plans_logliks(stack, rows, spans, plans, "global", batch_rows=2)
    shared_tokens = stack.token_runs
    alone_tokens = 0
    for (windows, merge, _), values in zip(plans, got):
        runner = PlanRunner(stack, windows, merge, "global")
        want = []
        for r, (a, b) in zip(rows, spans):
            pro = stack.prologue(torch.tensor([r]))
            before = stack.token_runs
            (h,) = runner.run([pro.hidden], [pro])
            alone_tokens += stack.token_runs - before
            logp = torch.log_softmax(stack.logits(stack.final(h)).float(), -1)[0]
            want.append(float(logp[a - 1 : b - 1].gather(-1, torch.tensor(r[a:b])[:, None]).double().sum()))
        np.testing.assert_allclose(values, want, rtol=0, atol=1e-5)
    # alone, each plan runs the original layers below its lowest window again (padding included, fewer tokens)
    assert shared_tokens < alone_tokens


def _alone(model, rows, spans) -> list[float]:
    out = []
    for r, (a, b) in zip(rows, spans):
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([r]), use_cache=False).logits.float(), -1)[0]
        out.append(float(sum(logp[i - 1, r[i]] for i in range(a, b))))
    return out


def _family_model(family: str, seed: int):
    """A tiny model; `qwen2-global`: Qwen2 as Qwen2.5 ships, every layer global (the tiny Qwen2 slides a window)."""
    if family != "qwen2-global":
        return tiny_model(family, n_layers=4, seed=seed)[0]
    from tiny_models import tiny_config
    from transformers import AutoModelForCausalLM

    config = tiny_config("qwen2", 4)
    config.use_sliding_window, config.sliding_window = False, None
    config.layer_types = ["full_attention"] * 4
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen2-global"])
def test_choices_that_share_a_context_run_it_once_and_score_as_each_alone(family):
    """Items as the task signal builds them: the choices of one item share their context, which then runs once;
    every choice's log-likelihood is the one of its own row, and fewer tokens go through the layers."""
    model = _family_model(family, seed=2)
    stack = InMemoryStack(model)
    rng = np.random.default_rng(2)
    rows, spans, packed = [], [], 0
    for n_ctx, n_choices in ((7, 4), (3, 2), (12, 4), (5, 1), (9, 2)):
        ctx = tuple(rng.integers(4, 256, size=n_ctx).tolist())
        packed += n_ctx
        for _ in range(n_choices):
            cont = tuple(rng.integers(4, 256, size=int(rng.integers(1, 6))).tolist())
            rows.append(ctx + cont)
            spans.append((len(ctx), len(ctx) + len(cont)))
            packed += len(cont)
    got = plans_logliks(stack, rows, spans, [([], "reference", None), ([(1, 2)], "keep-first", None)], "global",
                        batch_rows=2)
    stack.token_runs = 0
    plans_logliks(stack, rows, spans, [([], "reference", None)], "global", batch_rows=1)  # one item per batch
    if family != "qwen2":  # each context ran once
        assert stack.token_runs == 4 * packed < 4 * sum(len(r) for r in rows)
    else:  # the tiny Qwen2's upper layers slide a 4-token window: a packed row would see too far, so none is packed
        assert stack.token_runs == 4 * sum(len(r) for r in rows)
    np.testing.assert_allclose(got[0], _alone(model, rows, spans), rtol=0, atol=1e-4)
    dropped = _family_model(family, seed=2)
    del dropped.model.layers[2]
    dropped.config.num_hidden_layers = 3
    np.testing.assert_allclose(got[1], _alone(dropped, rows, spans), rtol=0, atol=1e-4)
    one_by_one = [plans_logliks(stack, [r], [s], [([], "reference", None)], "global")[0][0]
                  for r, s in zip(rows, spans)]
    np.testing.assert_allclose(got[0], one_by_one, rtol=0, atol=1e-4)
    # a row whose span is empty scores 0 and leaves the others as they were
    with_empty = plans_logliks(stack, [*rows, rows[0]], [*spans, (spans[0][1], spans[0][1])],
                               [([], "reference", None)], "global")[0]
    assert with_empty[-1] == 0.0
    np.testing.assert_allclose(with_empty[:-1], got[0], rtol=0, atol=1e-5)


def test_task_items_split_over_actors_give_the_values_of_one_process_bit_for_bit(monkeypatch):
    """Every actor gets every row and runs its share of one batching: the items are packed and batched as in one
    process whatever the number of actors, so the driver's sum is exactly the one-process result."""
    from types import SimpleNamespace

    import swm_ray.jobs.pool as pool_mod
    model = _family_model("llama", seed=2)
    stack = InMemoryStack(model)
    rng = np.random.default_rng(5)
    rows, spans = [], []
    for _ in range(23):
        ctx = tuple(rng.integers(4, 256, size=int(rng.integers(3, 12))).tolist())
        for _ in range(int(rng.integers(2, 5))):
            cont = tuple(rng.integers(4, 256, size=int(rng.integers(1, 8))).tolist())
            rows.append(ctx + cont)
            spans.append((len(ctx), len(ctx) + len(cont)))
    plans = [([], "reference", None), ([(1, 3)], "keep-first", None), ([(2, 3)], "reference", None)]
    one = plans_logliks(stack, rows, spans, plans, "global", batch_rows=4)

    class _Actor:  # an actor's method called in this process
        def __init__(self):
            self.task_logliks = SimpleNamespace(remote=lambda r, s, p, a, part: plans_logliks(
                stack, r, s, p, a, batch_rows=4, part=part))

    monkeypatch.setattr(pool_mod, "gather", lambda refs, *a, **kw: list(refs))
    for k in (2, 3, 5, 200):
        backend = object.__new__(pool_mod.RayBackend)
        backend.pool, backend.attention = SimpleNamespace(k=k, actors=[_Actor() for _ in range(k)]), "global"
        got = pool_mod.RayBackend.task_logliks(backend, SimpleNamespace(rows=rows, spans=spans), plans)
        for g, o in zip(got, one):
            assert np.array_equal(g, o)  # bit for bit
        assert all(np.count_nonzero(g) == len(rows) for g in got)


def test_layers_with_a_sliding_window_score_every_row_alone():
    """A stack whose layers do not all see the whole packed row (a sliding window shorter than it, another kind of
    layer, a kernel without custom masks) cannot take the packing mask: every row is scored as a row of its own,
    with the same values."""
    from swm_ray.compute.validation import packable

    model, _ = tiny_model("llama", n_layers=4, seed=3)
    stack = InMemoryStack(model)
    assert packable(stack, 64)
    stack.layer_types = ["sliding_attention", "full_attention"] * 2
    stack.config.sliding_window = 4
    assert not packable(stack, 64) and packable(stack, 4)
    stack.layer_types = ["linear_attention", "full_attention"] * 2
    assert not packable(stack, 4)
    config, stack.layer_types = stack.config, None
    stack.config = copy.copy(config)
    stack.config.sliding_window = None
    assert packable(stack, 64)
    stack.config._attn_implementation = "flash_attention_2"  # takes no custom mask
    assert not packable(stack, 64)
    stack.config, stack.layer_types = config, ["sliding_attention", "full_attention"] * 2  # window 4: one by one
    rng = np.random.default_rng(3)
    ctx = tuple(rng.integers(4, 256, size=6).tolist())
    rows = [ctx + (11, 12), ctx + (13,), ctx + (14, 15, 16)]
    spans = [(6, len(r)) for r in rows]
    stack.token_runs = 0
    got = plans_logliks(stack, rows, spans, [([], "reference", None)], "global")[0]
    assert stack.token_runs == 4 * 3 * 9  # three rows of their own, padded to 9 tokens, through 4 layers
    np.testing.assert_allclose(got, _alone(model, rows, spans), rtol=0, atol=1e-4)


def test_accuracy_counts_the_argmax_of_normalized_logliks():
    items = [ChoiceItem("piqa", 0, ((1,), (1,)), ((2, 3), (4,)), 0, (2.0, 1.0)),
             ChoiceItem("winogrande", 1, ((1,), (2,)), ((3,), (3,)), 1, (1.0, 1.0))]
    rows = task_rows(items)
    assert rows.owner == (0, 0, 1, 1) and rows.spans[0] == (1, 3)
    # item 0: -2/2 = -1 beats -1.5/1; item 1: choice 0 wins but the label is 1
    np.testing.assert_array_equal(item_scores(rows, [-2.0, -1.5, -0.1, -0.9]), [1.0, 0.0])
    assert accuracy(rows, [-2.0, -1.5, -0.1, -0.9]) == 0.5
    # the text loss: the correct continuation's NLL per byte (its size), or per token where no size is known
    np.testing.assert_allclose(text_losses(rows, [-2.0, -1.5, -0.1, -0.9]), [2.0 / 2, 0.9 / 1])
    sized = task_rows([ChoiceItem("piqa", 0, ((1,), (1,)), ((2, 3), (4,)), 1, (2.0, 1.0), (7, 3))])
    np.testing.assert_allclose(text_losses(sized, [-2.0, -1.5]), [1.5 / 3])


class _Scoring:
    def __init__(self, hits, text=None):
        self.hits, self.text = hits, text or {}

    def task_signals(self, rows, plans):
        out = []
        for w, _, _ in plans:
            key = tuple(map(tuple, w))
            out.append((np.asarray(self.hits[key], dtype=float),
                        np.asarray(self.text.get(key, np.zeros(len(self.hits[key]))), dtype=float)))
        return out


def _outcome(name, windows, loss):
    return Outcome(name, "x", "none", windows, "keep-first", losses=RowLosses(np.full(4, loss)))


def test_by_accuracy_ties_on_loss_go_to_the_most_accurate_and_ties_on_accuracy_to_the_lower_loss():
    """`select.auto_close_signal: accuracy` (the default before `resolved`)."""
    a, b, c = _outcome("a", [(1, 2)], 4.0), _outcome("b", [(3, 4)], 4.01), _outcome("c", [(5, 6)], 4.02)
    rows = task_rows([])
    scoring = _Scoring({((1, 2),): [1, 0, 0, 0], ((3, 4),): [1, 1, 1, 0], ((5, 6),): [1, 1, 0, 0]})
    chosen, why = _by_task_signal(a, [b, c], scoring, rows, 2.0, "close", lambda m: None, "accuracy")
    assert chosen is b and "chose b" in why and a.task["accuracy"] == 0.25
    scoring = _Scoring({((1, 2),): [1, 1, 0, 0], ((3, 4),): [1, 1, 0, 0], ((5, 6),): [0, 0, 0, 0]})
    a, b, c = _outcome("a", [(1, 2)], 4.0), _outcome("b", [(3, 4)], 4.01), _outcome("c", [(5, 6)], 4.02)
    chosen, why = _by_task_signal(a, [b, c], scoring, rows, 2.0, "close", lambda m: None, "accuracy")
    assert chosen is a and "agree with the lowest loss" in why


def test_a_close_call_goes_to_the_lowest_loss_on_the_items_text_unless_another_is_resolvably_more_accurate():
    """`select.auto_close_signal: text` (not the default): the lowest loss on the task items' text wins,
    whatever accuracy differences the items cannot resolve; a close one more accurate by more than 2 standard
    errors (paired) wins instead; ties of text loss go to the lower held-out loss."""
    rng = np.random.default_rng(4)
    n = 64
    hits = rng.integers(0, 2, n)
    flip = hits.copy()
    flip[np.flatnonzero(hits == 0)[:3]] = 1  # three items more: +0.047, well within the noise of 64 items
    base = rng.normal(0.9, 0.05, n)
    text = {((1, 2),): base + 0.02, ((3, 4),): base, ((5, 6),): base + 0.01}
    a, b, c = _outcome("a", [(1, 2)], 4.0), _outcome("b", [(3, 4)], 4.01), _outcome("c", [(5, 6)], 4.02)
    scoring = _Scoring({((1, 2),): flip, ((3, 4),): hits, ((5, 6),): hits}, text)
    chosen, why = _by_task_signal(a, [b, c], scoring, task_rows(_items(n)), 2.0, "close", lambda m: None, "text")
    assert chosen is b and "b has the lowest loss on their text" in why and a.task["accuracy"] > b.task["accuracy"]
    # resolvably more accurate: every item b misses, a gets right
    a, b, c = _outcome("a", [(1, 2)], 4.0), _outcome("b", [(3, 4)], 4.01), _outcome("c", [(5, 6)], 4.02)
    scoring = _Scoring({((1, 2),): np.ones(n), ((3, 4),): hits, ((5, 6),): hits}, text)
    chosen, why = _by_task_signal(a, [b, c], scoring, task_rows(_items(n)), 2.0, "close", lambda m: None, "text")
    assert chosen is a and "a is more accurate than b, of lowest text loss" in why
    # the same text loss: the lower held-out loss; and the lowest held-out loss agreeing
    a, b, c = _outcome("a", [(1, 2)], 4.0), _outcome("b", [(3, 4)], 4.01), _outcome("c", [(5, 6)], 4.02)
    scoring = _Scoring({k: hits for k in text}, {k: base for k in text})
    chosen, why = _by_task_signal(a, [b, c], scoring, task_rows(_items(n)), 2.0, "close", lambda m: None, "text")
    assert chosen is a and "agrees with the lowest held-out loss" in why


class _NoMoreWork:
    """A scoring that fails if asked for further rows or task items."""

    backend = type("B", (), {"extra_rows": 24})()

    def validate(self, plans, extra=False):
        raise AssertionError("a close call was drawn between candidates that planned the same model")

    def task_signals(self, rows, plans):
        raise AssertionError("task items were scored for candidates that planned the same model")


def test_two_planners_that_planned_the_same_model_are_no_close_call():
    """ReplaceMe's block and swm/keep-first often plan the same drop: one model, one loss, nothing to resolve.
    The first by name is chosen, and the record says the other was the same model."""
    rng = np.random.default_rng(1)
    losses = rng.normal(4.5, 0.1, size=8)
    a = Outcome("replaceme", "replaceme", "none", [(12, 18)], "keep-first", losses=RowLosses(losses.copy()))
    b = Outcome("swm/keep-first", "swm", "none", [(12, 18)], "keep-first", losses=RowLosses(losses.copy()))
    c = Outcome("shortgpt", "shortgpt", "none", [(2, 8)], "keep-first", losses=RowLosses(losses + 0.5))
    chosen, why = _choose([b, c, a], _NoMoreWork(), 2.0, 32, lambda m: None, tasks=task_rows([]))
    assert chosen is a and "swm/keep-first: the same model" in why and "close call" not in why


class _GateScoring:
    """Task-style items per plan (accuracy, text loss per item), keyed by windows; counts what it was asked."""

    backend = type("B", (), {"extra_rows": 0})()

    def __init__(self, text):
        self.text, self.asked = text, []

    def task_signals(self, rows, plans):
        self.asked += [tuple(map(tuple, w)) for w, _, _ in plans]
        return [(np.ones(len(self.text[tuple(map(tuple, w))])), np.asarray(self.text[tuple(map(tuple, w))]))
                for w, _, _ in plans]


def _fitted(name, windows, loss):
    return Outcome(name, "replaceme", "lstsq", windows, "keep-first", losses=RowLosses(np.full(4, loss)))


def test_a_fitted_plan_behind_on_the_task_items_text_is_set_aside():
    """The fit gate: the fitted plan has the lowest held-out loss, but on the task items' text it is behind the best
    plan without a fit by more than 2 standard errors, so that plan is chosen instead, and the record says why."""
    rng = np.random.default_rng(0)
    base = rng.normal(0.9, 0.05, size=64)
    fit = _fitted("replaceme+lstsq", [(2, 8)], 3.0)
    plain, worse = _outcome("sleb", [(3, 4)], 4.0), _outcome("shortgpt", [(5, 6)], 4.5)
    scoring = _GateScoring({((2, 8),): base + 0.03 + rng.normal(0, 0.01, 64), ((3, 4),): base,
                            ((5, 6),): base - 0.5})
    chosen, why = _choose([fit, plain, worse], scoring, 2.0, 32, lambda m: None, tasks=task_rows([]))
    assert chosen is plain and why.startswith("replaceme+lstsq set aside") and "behind sleb" in why
    assert fit.gate["passed"] is False and fit.gate["versus"] == "sleb" and fit.gate["text_loss_diff"] > 0.02
    assert sorted(scoring.asked) == [((2, 8),), ((3, 4),)]  # the rival of lowest loss, not the lower text loss
    assert fit.record()["fit_gate"] == fit.gate and fit.versus is not None
    items = fit.record()["task_items"]  # per item, so a rule over them can be replayed from plan.json
    np.testing.assert_allclose(items["text_loss"], scoring.text[((2, 8),)], atol=1e-5)
    assert items["correct"] == [1] * 64 and items["further_text_loss"] is None
    assert worse.record()["task_items"] is None  # never scored on the items


def test_a_fitted_plan_that_holds_on_the_task_items_text_is_chosen():
    rng = np.random.default_rng(1)
    base = rng.normal(0.9, 0.05, size=64)
    fit, plain = _fitted("replaceme+lstsq", [(2, 8)], 3.0), _outcome("sleb", [(3, 4)], 4.0)
    scoring = _GateScoring({((2, 8),): base - 0.01 + rng.normal(0, 0.01, 64), ((3, 4),): base})
    chosen, why = _choose([plain, fit], scoring, 2.0, 32, lambda m: None, tasks=task_rows([]))
    assert chosen is fit and "fit gate passed" in why and fit.gate["passed"] is True
    # a plan within 2 standard errors behind passes too: the gate sets aside only what is resolvably worse
    fit, plain = _fitted("replaceme+lstsq", [(2, 8)], 3.0), _outcome("sleb", [(3, 4)], 4.0)
    noise = rng.normal(0, 0.01, 64)
    scoring = _GateScoring({((2, 8),): base + noise - noise.mean() + 0.001, ((3, 4),): base})
    chosen, why = _choose([plain, fit], scoring, 2.0, 32, lambda m: None, tasks=task_rows([]))
    assert chosen is fit and fit.gate["passed"] and fit.gate["text_loss_diff"] == pytest.approx(0.001)
    # without task items there is no gate, and the record says so
    fit, plain = _fitted("replaceme+lstsq", [(2, 8)], 3.0), _outcome("sleb", [(3, 4)], 4.0)
    chosen, why = _choose([plain, fit], _NoMoreWork(), 2.0, 4, lambda m: None, tasks_note="off (0 items)")
    assert chosen is fit and "fit gate not run (task-style signal off (0 items))" in why and fit.gate is None


class _FurtherScoring(_GateScoring):
    """Per plan, one text loss per first item and another per further item (told apart by the rows asked)."""

    def __init__(self, text, further):
        super().__init__(text)
        self.further, self.asked_further = further, []

    def task_signals(self, rows, plans):
        if rows.further is None and rows.n_items:  # the further items' own rows
            self.asked_further += [tuple(map(tuple, w)) for w, _, _ in plans]
            return [(np.ones(len(self.further[tuple(map(tuple, w))])), np.asarray(self.further[tuple(map(tuple, w))]))
                    for w, _, _ in plans]
        return super().task_signals(rows, plans)


def _items(n, start=0):
    return [ChoiceItem("piqa", start + i, ((1,), (1,)), ((2,), (3,)), 0, (1.0, 1.0)) for i in range(n)]


def _shifted(noise, z_target):
    """`noise` recentred so that its paired mean over its standard error is `z_target`."""
    noise = noise - noise.mean()
    se = noise.std(ddof=1) / np.sqrt(len(noise))
    return noise + z_target * se


@pytest.mark.parametrize("first_z,band,reads_further", [(2.3, 1.0, True), (1.4, 1.0, True), (3.4, 1.0, False),
                                                        (0.5, 1.0, False), (2.3, 0.0, False)])
def test_a_fit_gate_verdict_near_its_margin_is_read_again_on_the_further_items(first_z, band, reads_further):
    """Within `band` standard errors of the margin (2), the fitted plan and its rival are scored on the further
    items too and judged on all of them; further from the margin, or with band 0, the first items decide.
    Here the first items put the fitted plan `first_z` standard errors behind; on the further items it is level,
    so where they are read the verdict on all the items is 'passed'."""
    rng = np.random.default_rng(2)
    base, base_more = rng.normal(0.9, 0.05, 64), rng.normal(0.9, 0.05, 128)
    text = {((2, 8),): base + _shifted(rng.normal(0, 0.01, 64), first_z), ((3, 4),): base}
    further = {((2, 8),): base_more + _shifted(rng.normal(0, 0.01, 128), 0.0), ((3, 4),): base_more}
    fit, plain = _fitted("replaceme+lstsq", [(2, 8)], 3.0), _outcome("sleb", [(3, 4)], 4.0)
    scoring = _FurtherScoring(text, further)
    tasks = task_rows(_items(64), _items(128, start=64))
    chosen, why = _choose([plain, fit], scoring, 2.0, 32, lambda m: None, tasks=tasks, band=band)
    if reads_further:
        assert sorted(scoring.asked_further) == [((2, 8),), ((3, 4),)]
        assert fit.gate["items"] == 192 and fit.gate["first_items"]["items"] == 64
        assert fit.gate["first_items"]["passed"] is (first_z <= 2.0)
        assert fit.gate["passed"] is True and chosen is fit
        np.testing.assert_allclose(plain.record()["task_items"]["further_text_loss"], further[((3, 4),)], atol=1e-5)
    else:
        assert scoring.asked_further == [] and fit.gate["items"] == 64 and "first_items" not in fit.gate
        assert fit.gate["passed"] is (first_z <= 2.0) and (chosen is fit) is (first_z <= 2.0)


def test_two_fitted_plans_near_the_margin_score_their_rivals_further_items_once():
    """The gate sets aside the first fitted plan on all the items and checks the next one against the same rival:
    the rival's further items are scored once."""
    rng = np.random.default_rng(3)
    base, base_more = rng.normal(0.9, 0.05, 64), rng.normal(0.9, 0.05, 128)
    text = {((2, 8),): base + _shifted(rng.normal(0, 0.01, 64), 2.5), ((3, 4),): base,
            ((1, 7),): base + _shifted(rng.normal(0, 0.01, 64), 2.2)}
    further = {((2, 8),): base_more + _shifted(rng.normal(0, 0.01, 128), 4.0), ((3, 4),): base_more,
               ((1, 7),): base_more + _shifted(rng.normal(0, 0.01, 128), 0.5)}
    first, second = _fitted("replaceme+lstsq", [(2, 8)], 3.0), _fitted("sleb+lstsq", [(1, 7)], 3.1)
    plain = _outcome("sleb", [(3, 4)], 4.0)
    scoring = _FurtherScoring(text, further)
    chosen, why = _choose([plain, first, second], scoring, 2.0, 32, lambda m: None,
                          tasks=task_rows(_items(64), _items(128, start=64)), band=1.0)
    assert first.gate["passed"] is False and second.gate["passed"] is True and chosen is second
    assert sorted(scoring.asked_further) == [((1, 7),), ((2, 8),), ((3, 4),)]
    assert why.startswith("replaceme+lstsq set aside") and "fit gate passed" in why


def test_auto_task_rows_carry_the_gates_further_items_as_configured(tiny_llama_dir):
    from swm_ray.config import build_config
    from swm_ray.methods.tasksignal import auto_task_rows

    def rows(**flags):
        cfg = build_config(flags={"model.source": str(tiny_llama_dir), "select.auto_task_items": 30, **flags})
        got, why = auto_task_rows(cfg, str(tiny_llama_dir))
        assert why is None
        return got

    got = rows(**{"select.auto_gate_items": 90})
    assert got.n_items == 30 and got.further.n_items == 60
    assert [it.doc for it in got.items] == [it.doc for it in rows(**{"select.auto_gate_items": 0}).items]
    assert rows(**{"select.auto_gate_items": 30}).further is None
    assert rows(**{"select.auto_gate_items": 90, "select.auto_gate_band": 0.0}).further is None
    assert rows().further.n_items == 576 - 30  # the default: 576 items in all


@pytest.mark.parametrize("signal", ["accuracy", "text", "resolved"])
def test_the_close_call_reads_the_signal_it_is_given(signal):
    """`_choose` hands `select.auto_close_signal` to the close call: the more accurate plan, or the one of lower
    loss on the items' text (for `resolved`, lower on every item: resolved at any margin)."""
    rng = np.random.default_rng(6)
    hits = rng.integers(0, 2, 64)
    more = hits.copy()
    more[np.flatnonzero(hits == 0)[:2]] = 1
    base = rng.normal(0.9, 0.05, 64)
    scoring = _Scoring({((1, 2),): more, ((3, 4),): hits}, {((1, 2),): base + 0.01, ((3, 4),): base})
    scoring.backend = type("B", (), {"extra_rows": 0})()
    a = Outcome("a", "x", "none", [(1, 2)], "keep-first", losses=RowLosses(np.array([4.0, 4.1, 3.9, 4.0])))
    b = Outcome("b", "x", "none", [(3, 4)], "keep-first", losses=RowLosses(np.array([4.0, 4.12, 3.91, 4.0])))
    chosen, why = _choose([a, b], scoring, 2.0, 4, lambda m: None, tasks=task_rows(_items(64)), close_signal=signal)
    assert chosen is (a if signal == "accuracy" else b)


def test_a_resolved_close_call_keeps_the_lowest_held_out_loss_unless_the_items_resolve_another_ahead():
    """`select.auto_close_signal: resolved` (the default): `a` (lowest held-out loss) stands against differences
    the 64 items cannot resolve, on text or accuracy; a plan ahead on the text by more than 2 standard errors
    (paired) wins, before one ahead on accuracy; one ahead on accuracy only wins where nothing is ahead on the
    text. Whatever the order the close ones come in."""
    rng = np.random.default_rng(11)
    n = 64
    hits = rng.integers(0, 2, n)
    more = hits.copy()
    more[np.flatnonzero(hits == 0)[:3]] = 1  # three items more: within the noise of 64 items
    base = rng.normal(0.9, 0.05, n)
    noisy = base + _shifted(rng.normal(0, 0.02, n), -1.5)  # 1.5 standard errors lower: not resolved

    def pick(hits_by, text_by, order=("b", "c")):
        outs = {"a": _outcome("a", [(1, 2)], 4.0), "b": _outcome("b", [(3, 4)], 4.01),
                "c": _outcome("c", [(5, 6)], 4.02)}
        scoring = _Scoring({tuple(outs[k].windows): v for k, v in hits_by.items()},
                           {tuple(outs[k].windows): v for k, v in text_by.items()})
        return _by_task_signal(outs["a"], [outs[k] for k in order], scoring, task_rows(_items(n)), 2.0, "close",
                               lambda m: None, "resolved")

    # unresolved both ways: the lowest held-out loss stands, though b is more accurate and c lower on the text
    chosen, why = pick({"a": hits, "b": more, "c": hits}, {"a": base, "b": base, "c": noisy})
    assert chosen.name == "a" and "resolve no other ahead" in why
    # c ahead on the text beyond 2 standard errors; b only more accurate by noise
    ahead = base + _shifted(rng.normal(0, 0.02, n), -3.0)
    for order in (("b", "c"), ("c", "b")):
        chosen, why = pick({"a": hits, "b": more, "c": hits}, {"a": base, "b": base, "c": ahead}, order)
        assert chosen.name == "c" and "c is ahead of a" in why
    # b resolvably more accurate (every item right) and nothing ahead on the text: b
    chosen, why = pick({"a": hits, "b": np.ones(n), "c": hits}, {"a": base, "b": base + 0.001, "c": noisy})
    assert chosen.name == "b" and "b is more accurate than a" in why
    # resolvably ahead on the text wins over resolvably more accurate
    chosen, why = pick({"a": hits, "b": np.ones(n), "c": hits}, {"a": base, "b": base, "c": ahead}, ("c", "b"))
    assert chosen.name == "c"


class _MoreRows(_Scoring):
    """Task items as `_Scoring`, and 8 further held-out rows per plan for a close call."""

    backend = type("B", (), {"extra_rows": 8})()

    def __init__(self, hits, text, more_rows):
        super().__init__(hits, text)
        self.more_rows = more_rows

    def validate(self, plans, extra=False):
        assert extra
        return [RowLosses(self.more_rows[tuple(map(tuple, w))]) for w, _, _ in plans]


@pytest.mark.parametrize("further", [False, True])
@pytest.mark.parametrize("signal", ["accuracy", "text", "resolved"])
def test_a_close_call_replayed_from_the_record_chooses_as_the_run_did(signal, further):
    """`replay_close_call` reads a run's `extra.auto` candidates (row losses, with a close call's further rows;
    per-item values) and decides its close call again: by the rule the run used, it names the plan the run
    chose, for each rule; a twin of a contender is no second contender, and a plan the held-out loss resolves is
    none."""
    rng = np.random.default_rng(5)
    n = 64
    rows = rng.normal(4.4, 0.2, 8)
    hits = rng.integers(0, 2, n)
    more = hits.copy()
    more[np.flatnonzero(hits == 0)[:2]] = 1
    base = rng.normal(0.9, 0.05, n)
    text = {((1, 2),): base, ((3, 4),): base - 0.01, ((5, 6),): base - 0.02}
    if further:
        extra = rng.normal(4.4, 0.2, 8)
        scoring = _MoreRows({((1, 2),): more, ((3, 4),): hits, ((5, 6),): hits}, text,
                            {((1, 2),): extra, ((3, 4),): extra + _shifted(rng.normal(0, 0.02, 8), 0.3),
                             ((5, 6),): extra + 0.3 + rng.normal(0, 0.02, 8)})  # resolves c: behind on 16 rows
    else:
        scoring = _Scoring({((1, 2),): more, ((3, 4),): hits, ((5, 6),): hits}, text)
        scoring.backend = type("B", (), {"extra_rows": 0})()
    near, nearer = rows + _shifted(rng.normal(0, 0.02, 8), 1.0), rows + _shifted(rng.normal(0, 0.02, 8), 0.5)
    outs = [Outcome("a", "x", "none", [(1, 2)], "keep-first", losses=RowLosses(rows.copy())),
            Outcome("b", "x", "none", [(3, 4)], "keep-first", losses=RowLosses(nearer)),
            Outcome("b-twin", "y", "none", [(3, 4)], "keep-first", losses=RowLosses(nearer.copy())),
            Outcome("far", "x", "none", [(7, 8)], "keep-first", losses=RowLosses(rows + 0.5)),
            Outcome("c", "x", "none", [(5, 6)], "keep-first", losses=RowLosses(near))]
    chosen, _ = _choose(outs, scoring, 2.0, 16, lambda m: None, tasks=task_rows(_items(n)), close_signal=signal)
    record = {"candidates": [o.record() for o in outs]}
    assert {len(c["row_nll"]) for c in record["candidates"] if c["candidate"] in "abc"} == {16 if further else 8}
    by = {c["candidate"]: c for c in record["candidates"]}  # the twin's record: the same rows and items as b's
    assert by["b-twin"]["row_nll"] == by["b"]["row_nll"] and by["b-twin"]["task_items"] == by["b"]["task_items"]
    assert by["b"]["task_items"] is not None
    got = replay_close_call(record, signal, 2.0)
    assert got["chosen"] == chosen.name and sorted(got["contenders"]) == (["a", "b"] if further else ["a", "b", "c"])
    assert chosen.name == ("a" if signal == "accuracy" else "b" if further else "c")


def test_the_default_close_call_is_the_resolved_rule():
    from swm_ray.config import build_config

    assert build_config(flags={}).select.auto_close_signal == "resolved"
