"""Accuracy with standard errors: the formulas against hand-computed values, per-item vectors from lm-eval, the
first-N-items rule, the held-out slice kept out of reported scores, and the benchmark that pairs plans."""

from __future__ import annotations

import importlib.util
import json
import math
import random
from pathlib import Path

import pytest
from tiny_models import tiny_model

from swm_ray.errors import UserError
from swm_ray.evaluation import accuracy as acc
from swm_ray.evaluation import report as report_mod
from swm_ray.evaluation import zeroshot as zs

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_accuracy.py"


@pytest.fixture(scope="module")
def tiny():
    return tiny_model("llama", n_layers=2)


# --- the formulas ----------------------------------------------------------------------------------------------


def test_se_of_a_mean_of_zero_one_items():
    # 3 of 5 correct: p = 0.6, sample variance (3*0.4² + 2*0.6²)/4 = 0.3, SE = sqrt(0.3/5) = sqrt(p(1-p)/(n-1))
    mean, se = acc.mean_se([1, 1, 1, 0, 0])
    assert mean == pytest.approx(0.6) and se == pytest.approx(math.sqrt(0.06))
    assert se == pytest.approx(math.sqrt(0.6 * 0.4 / 4))
    from lm_eval.api.metrics import mean_stderr

    assert se == pytest.approx(mean_stderr([1, 1, 1, 0, 0]))  # lm-eval's acc_stderr
    assert acc.mean_se([1]) == (1.0, None)
    assert acc.task_accuracy({0: 1, 1: 0, 2: 0, 3: 0}) == pytest.approx({"acc": 0.25, "se": 0.25, "n": 4})
    with pytest.raises(ValueError):
        acc.mean_se([])


def test_paired_difference_is_the_se_of_per_item_differences():
    a = {0: 1, 1: 1, 2: 0, 3: 1, 4: 0, 5: 1}
    b = {0: 1, 1: 0, 2: 0, 3: 1, 4: 1, 5: 0}
    # d = 0, 1, 0, 0, -1, 1: mean 1/6; sum of squared deviations 3*(1/6)² + 2*(5/6)² + (7/6)² = 102/36
    d = acc.paired_difference(a, b)
    assert d["diff"] == pytest.approx(1 / 6) and d["n"] == 6
    assert d["se"] == pytest.approx(math.sqrt(102 / 36 / 5 / 6))
    assert d["se"] == pytest.approx(acc.mean_se([a[i] - b[i] for i in a])[1])
    # var(a - b) = var(a) + var(b) - 2 cov(a, b): pairing removes what the two models share
    n, ma, mb = 6, 4 / 6, 3 / 6
    cov = sum((a[i] - ma) * (b[i] - mb) for i in a) / (n - 1)
    se_a, se_b = acc.mean_se(list(a.values()))[1], acc.mean_se(list(b.values()))[1]
    assert d["se"] ** 2 == pytest.approx(se_a**2 + se_b**2 - 2 * cov / n)
    assert acc.paired_difference(a, a) == {"diff": 0.0, "se": 0.0, "n": 6}
    with pytest.raises(ValueError, match="not the same items"):
        acc.paired_difference(a, {**b, 9: 1})


def test_se_of_a_mean_over_independent_tasks():
    mean, se = acc.mean_of_tasks([0.5, 0.6, 0.7], [0.03, 0.04, 0.12])
    assert mean == pytest.approx(0.6) and se == pytest.approx(0.13 / 3)  # sqrt(.0009 + .0016 + .0144) = .13
    mean, se = acc.mean_of_tasks([0.4] * 6, [0.02] * 6)
    assert se == pytest.approx(0.02 / math.sqrt(6))
    assert acc.mean_of_tasks([0.5, 0.5], [0.1, None]) == (0.5, None)


def _vectors(seed: int, tasks: dict[str, int], p: float) -> dict[str, dict[int, int]]:
    rng = random.Random(seed)
    return {t: {i: int(rng.random() < p) for i in range(n)} for t, n in tasks.items()}


def test_summarize_six_tasks_against_the_formulas():
    sizes = {"piqa": 50, "hellaswag": 40, "winogrande": 30, "arc_easy": 35, "arc_challenge": 20, "openbookqa": 25}
    base = _vectors(0, sizes, 0.6)
    rng = random.Random(1)
    model = {t: {i: v if rng.random() < 0.8 else 1 - v for i, v in items.items()} for t, items in base.items()}
    s = acc.summarize(model, base, list(zs.MEAN_TASKS))
    per = {t: acc.task_accuracy(model[t]) for t in sizes}
    assert s["mean"] == pytest.approx(sum(r["acc"] for r in per.values()) / 6)
    assert s["mean_se"] == pytest.approx(math.sqrt(sum(r["se"] ** 2 for r in per.values())) / 6)
    diffs = {t: acc.paired_difference(model[t], base[t]) for t in sizes}
    assert s["diff"] == pytest.approx(s["mean"] - acc.summarize(base)["mean"])  # same items: paired = plain
    assert s["diff_se"] == pytest.approx(math.sqrt(sum(d["se"] ** 2 for d in diffs.values())) / 6)
    for t in sizes:
        assert s["tasks"][t]["diff_se"] == pytest.approx(diffs[t]["se"])
    # the paired SE is smaller than the unpaired one when the models mostly agree
    unpaired = math.sqrt(s["mean_se"] ** 2 + acc.summarize(base)["mean_se"] ** 2)
    assert s["diff_se"] < unpaired
    with pytest.raises(ValueError, match="no per-item results"):
        acc.summarize({"piqa": model["piqa"]}, None, ["piqa", "boolq"])


def test_items_encode_round_trip():
    items = {0: 1, 1: 0, 2: 1, 7: 1, 9: 0, 10: 0, 11: 1}
    packed = acc.encode_items(items)
    assert packed == {"doc_ids": "0-2,7,9-11", "correct": "1011001"}
    assert acc.decode_items(json.loads(json.dumps(packed))) == items
    assert acc.decode_items(acc.encode_items({})) == {}
    with pytest.raises(ValueError, match="malformed"):
        acc.decode_items({"doc_ids": "0-2", "correct": "10"})


def test_accuracy_table():
    base = _vectors(2, {"piqa": 20, "arc_easy": 20}, 0.5)
    model = {t: {i: 1 - v if i % 5 == 0 else v for i, v in items.items()} for t, items in base.items()}
    rows = [("original", acc.summarize(base)), ("plan", acc.summarize(model, base))]
    table = report_mod.accuracy_table(rows, ["piqa", "arc_easy"], "original")
    lines = table.splitlines()
    assert lines[0] == "| model | 2-task mean | Δ vs original (paired) | PIQA | ARC-e |"
    s = rows[1][1]
    assert f"| plan | {s['mean']:.3f} ± {s['mean_se']:.3f} | {s['diff']:+.3f} ± {s['diff_se']:.3f} |" in lines[3]
    assert lines[2].startswith("| original | ") and " | - | " in lines[2]
    diff = report_mod.accuracy_table(rows, ["piqa", "arc_easy"], "original", per_task="diff")
    assert f"{s['tasks']['piqa']['diff']:+.3f} ± {s['tasks']['piqa']['diff_se']:.3f}" in diff


# --- which items ---------------------------------------------------------------------------------------------


def test_six_task_mean_definition():
    assert zs.MEAN_TASKS == ("piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
    assert {t: zs.paper_metric(t) for t in zs.MEAN_TASKS} == {
        "piqa": "acc", "hellaswag": "acc_norm", "winogrande": "acc", "arc_easy": "acc",
        "arc_challenge": "acc_norm", "openbookqa": "acc_norm"}


def test_first_n_items_rule():
    rows = {t: zs.task_rows(t) for t in zs.TASKS}
    assert rows == {"boolq": 3270, "piqa": 1838, "hellaswag": 10042, "winogrande": 1267, "arc_easy": 570,
                    "arc_challenge": 299, "openbookqa": 500}
    assert zs.REPORTED_LIMIT == 500
    for task in zs.MEAN_TASKS:
        assert zs.reported_items(task) == range(min(500, rows[task]))
    assert len(zs.reported_items("arc_challenge")) == 299 and len(zs.reported_items("openbookqa")) == 500
    assert zs.reported_items("piqa", 3) == range(3)
    assert zs.reported_items("piqa", None) == range(1000) and zs.reported_items("arc_easy", None) == range(570)


@pytest.mark.parametrize("task", list(zs.TASKS))
def test_reported_items_never_reach_the_held_out_slice(task):
    held = set(zs.held_out_items(task))
    if task in ("piqa", "hellaswag", "winogrande"):
        assert zs.held_out_items(task) == range(1000, zs.task_rows(task))
    else:
        assert not held
    for limit in (1, 500, 999, 1000, 1001, 5000, None):
        assert not held & set(zs.reported_items(task, limit))


def test_zeroshot_stops_before_the_held_out_slice(monkeypatch, tiny):
    calls = []

    def fake(model, tok, tasks, limit, batch_size, offline, *, log_samples=False, samples=None):
        calls.append((list(tasks), limit, samples))
        return {"results": {t: {f"{zs.paper_metric(t)},none": 0.5} for t in tasks},
                "n-samples": {t: {"effective": limit} for t in tasks}}

    monkeypatch.setattr(zs, "run_lm_eval", fake)
    six = list(zs.MEAN_TASKS)
    zs.zeroshot(*tiny, six, limit=500)
    assert calls == [(six, 500, None)]
    calls.clear()
    zs.zeroshot(*tiny, six)  # all items: the three tasks with a held-out slice stop at 1000
    assert calls == [(["piqa", "hellaswag", "winogrande"], 1000, None),
                     (["arc_easy", "arc_challenge", "openbookqa"], None, None)]
    calls.clear()
    zs.zeroshot(*tiny, ["boolq", "piqa"], limit=2000)
    assert calls == [(["boolq"], 2000, None), (["piqa"], 1000, None)]
    calls.clear()
    zs.zeroshot(*tiny, ["piqa"], doc_ids={"piqa": [1500, 3, 3]})  # chosen items: any, sorted for lm-eval
    assert calls == [(["piqa"], None, {"piqa": [3, 1500]})]
    with pytest.raises(UserError, match="either limit or doc_ids"):
        zs.zeroshot(*tiny, ["piqa"], limit=5, doc_ids={"piqa": [1]})
    with pytest.raises(UserError, match="without the task"):
        zs.zeroshot(*tiny, ["piqa", "arc_easy"], doc_ids={"piqa": [1]})
    with pytest.raises(UserError, match=r"0\.\.1837"):
        zs.zeroshot(*tiny, ["piqa"], doc_ids={"piqa": [1838]})


# --- per-item vectors from lm-eval (tiny model, a few items) ---------------------------------------------------


def _arrow_rows(task: str) -> list[dict]:
    import pyarrow as pa

    return pa.ipc.open_stream(pa.memory_map(str(zs.data_file(task)))).read_all().to_pylist()


def test_per_item_vectors_match_lm_eval_aggregates(tiny):
    res = zs.zeroshot(*tiny, list(zs.MEAN_TASKS), limit=4, batch_size=8, per_item=True)
    assert list(res["items"]) == list(zs.MEAN_TASKS)
    for task, row in res["tasks"].items():
        items = res["items"][task]
        assert list(items) == list(zs.reported_items(task, 4)) and set(items.values()) <= {0, 1}
        stats = acc.task_accuracy(items)
        assert stats["n"] == row["n"] and stats["acc"] == pytest.approx(row["value"])
        assert stats["se"] == pytest.approx(row["stderr"])  # same estimator as lm-eval's acc_stderr
    assert res["mean"] == pytest.approx(acc.summarize(res["items"])["mean"])
    plain = zs.zeroshot(*tiny, ["piqa"], limit=4, batch_size=8)  # the default: no per-item results
    assert "items" not in plain and plain["tasks"]["piqa"]["value"] == res["tasks"]["piqa"]["value"]


def test_limit_scores_the_first_documents_in_file_order(tiny):
    tasks = ["piqa", "hellaswag", "winogrande"]
    zs.set_offline_env()
    by_limit = zs.run_lm_eval(*tiny, tasks, 3, 8, True, log_samples=True)
    explicit = zs.run_lm_eval(*tiny, tasks, None, 8, True, log_samples=True, samples={t: [0, 1, 2] for t in tasks})
    keys = {"piqa": "goal", "hellaswag": "ctx", "winogrande": "sentence"}
    for task in tasks:
        rows = _arrow_rows(task)[:3]
        logged = sorted(by_limit["samples"][task], key=lambda r: r["doc_id"])
        assert [r["doc_id"] for r in logged] == [0, 1, 2]
        assert [r["doc"][keys[task]] for r in logged] == [row[keys[task]] for row in rows]
        assert zs.per_item_correct(by_limit, [task]) == zs.per_item_correct(explicit, [task])
    # chosen documents come back under their own index (lm-eval maps them back in file order)
    chosen = zs.run_lm_eval(*tiny, ["piqa"], None, 8, True, log_samples=True, samples={"piqa": [2, 1200]})
    rows = _arrow_rows("piqa")
    assert {r["doc_id"]: r["doc"]["goal"] for r in chosen["samples"]["piqa"]} == {
        2: rows[2]["goal"], 1200: rows[1200]["goal"]}
    res = zs.zeroshot(*tiny, ["piqa"], doc_ids={"piqa": [1200, 2]}, per_item=True)
    assert list(res["items"]["piqa"]) == [2, 1200] and res["tasks"]["piqa"]["n"] == 2


def test_per_item_through_evaluate_model(tiny):
    from swm_ray.evaluation.suite import evaluate_model

    res = evaluate_model(*tiny, tasks=["arc_challenge"], limit=3, ppl_data="none", per_item=True)
    assert list(res["items"]["arc_challenge"]) == [0, 1, 2]
    assert "items" not in evaluate_model(*tiny, tasks=["arc_challenge"], limit=3, ppl_data="none")


# --- the benchmark: resumable, pairs plans with the original ---------------------------------------------------


def _bench():
    spec = importlib.util.spec_from_file_location("bench_accuracy", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_accuracy_resumes_and_pairs(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    from swm_ray.plan.plan import Plan

    plan = Plan(windows=[[1, 2]], num_layers_before=6, merge="mean", source_model=str(tiny_llama_dir)).save(
        tmp_path / "plan.json")
    out = tmp_path / "acc.json"
    argv = ["bench_accuracy.py", f"merged={plan}", "--tasks", "piqa,arc_challenge", "--limit", "3", "--threads", "1",
            "--out", str(out)]
    bench = _bench()
    monkeypatch.setattr("sys.argv", argv)
    bench.main()
    done = json.loads(out.read_text())
    assert list(done["rows"]) == ["original", "merged"]
    for row in done["rows"].values():
        for task in ("piqa", "arc_challenge"):
            r = row["tasks"][task]
            assert r["limit"] == 3 and r["n"] == 3
            assert acc.task_accuracy(acc.decode_items(r["items"]))["acc"] == pytest.approx(r["acc"])
    table = capsys.readouterr().out
    assert "| merged | " in table and "per-task paired differences" in table

    # a rerun scores nothing; a new task is added to every row, the rest kept
    import swm_ray.evaluation.zeroshot as zmod

    real, scored = zmod.zeroshot, []
    monkeypatch.setattr(zmod, "zeroshot", lambda *a, **k: scored.append(a[2]) or real(*a, **k))
    bench.main()
    assert scored == []
    monkeypatch.setattr("sys.argv", [*argv[:3], "piqa,arc_challenge,openbookqa", *argv[4:]])
    bench.main()
    assert scored == [["openbookqa"], ["openbookqa"]]
    rows = bench.summaries(json.loads(out.read_text()), ["piqa", "arc_challenge", "openbookqa"], "original")
    merged = dict(rows)["merged"]
    assert merged["diff"] is not None and set(merged["tasks"]) == {"piqa", "arc_challenge", "openbookqa"}
