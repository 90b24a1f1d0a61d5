"""How each command turns flags and config values into the RunConfig it runs (defaults < --config < flags <
--set; a flag left out never overrides the config), shipped configs by name, `--paper` conflicts, the
`config` command, and `submit`'s command list and credential warnings.

Every command is invoked through the real typer app; its job module is replaced by a stub whose `run_*`
records the config it receives and stops there (no model, no Ray).
"""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

import pytest
import typer
import yaml
from typer.testing import CliRunner

from swm_ray.cli import app
from swm_ray.commands.evaluate import report_path
from swm_ray.config import RunConfig, build_config

ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner()
JOBS = {"analyze": ("swm_ray.jobs.analyze", "run_analyze"), "compress": ("swm_ray.jobs.compress", "run_compress"),
        "eval": ("swm_ray.jobs.eval", "run_eval"), "grid": ("swm_ray.jobs.grid", "run_grid"),
        "heal": ("swm_ray.jobs.heal", "run_heal"), "compress --heal": ("swm_ray.jobs.heal", "run_compress_and_heal")}
NOT_CONFIG = {"config", "set_"}  # options that are not a config path themselves
EXTRA = {"grid": {"resume"}}  # grid --resume names an experiment, not a config value (checked below)


class Captured(Exception):
    pass


@pytest.fixture()
def capture(monkeypatch):
    """Stub every job module; returns a dict that receives the command's config (and call details)."""
    seen: dict = {}
    stubs: dict[str, dict] = {}
    for command, (module, fn) in JOBS.items():
        def run(cfg, *args, _command=command, **kwargs):
            seen.update(command=_command, cfg=cfg, args=args, kwargs=kwargs)
            raise Captured

        stubs.setdefault(module, {})[fn] = run
    for module, fns in stubs.items():
        monkeypatch.setitem(sys.modules, module, types.SimpleNamespace(**fns))
    monkeypatch.setitem(sys.modules, "swm_ray.recipes.results", types.SimpleNamespace(markdown_table=lambda rows: ""))
    return seen


def invoke(seen: dict, *args: str) -> RunConfig:
    seen.clear()
    res = runner.invoke(app, list(args))
    assert isinstance(res.exception, Captured), f"{args}: {res.output}"
    return seen["cfg"]


def _get(cfg: RunConfig, dotted: str):
    node = cfg
    for key in dotted.split("."):
        node = getattr(node, key)
    return list(node) if isinstance(node, tuple) else node


# A config file with a non-default value at every path a flag of any command reaches.
CONFIG = {
    "model": {"source": "cfg-model", "dtype": "float16", "device": "cpu", "allow_pickle": True,
              "trust_remote_code": True, "stream": "never", "max_memory": "1GB"},
    "data": {"source": "cfg-data", "samples": 7, "seq_len": 33, "batch_size": 6},
    "stats": {"kernel": "rbf", "skip_first_tokens": 0},
    "ray": {"actors": 3, "gpus_per_actor": 2},
    "select": {"method": "sleb", "criterion": "kl", "search": "top-down", "layers": 3, "paper_loop": False},
    "merge": {"method": "mean", "compensate": "scale"},
    "eval": {"tasks": ["piqa"], "limit": 4, "batch_size": 3, "ppl_data": "cfg-ppl.txt", "ppl_bos": "none",
             "latency": True, "latency_runs": 2, "latency_warmup": 1, "latency_new_tokens": 5, "offline": False,
             "baseline": "cfg-base", "enabled": True},
    "grid": {"models": ["cfg-m1", "cfg-m2"], "criteria": ["kl"], "searches": ["top-down"], "merges": ["mean"],
             "ratios": [0.1], "baselines": ["sleb"],
             "compensate": ["scale"], "heal": ["lora"], "concurrency": 2, "cpus_per_trial": 2.0, "gpus_per_trial": 0.5},
    "out": "cfg-out",
    "overwrite": True,
    "resume": True,
}

COMMON = [  # (option, args, config path, value the flag gives)
    ("allow_pickle", ["--allow-pickle"], "model.allow_pickle", True),
    ("trust_remote_code", ["--trust-remote-code"], "model.trust_remote_code", True),
    ("stream_layers", ["--stream-layers"], "model.stream", "always"),
    ("max_memory", ["--max-memory", "2GB"], "model.max_memory", "2GB"),
    ("gpus_per_actor", ["--gpus-per-actor", "4"], "ray.gpus_per_actor", 4),
]
FLAGS = {
    "analyze": [
        ("model", ["flag-model"], "model.source", "flag-model"),
        ("data", ["--data", "flag-data"], "data.source", "flag-data"),
        ("samples", ["--samples", "9"], "data.samples", 9),
        ("seq_len", ["--seq-len", "17"], "data.seq_len", 17),
        ("batch_size", ["--batch-size", "8"], "data.batch_size", 8),
        ("actors", ["--actors", "5"], "ray.actors", 5),
        ("kernel", ["--kernel", "linear"], "stats.kernel", "linear"),
        ("skip_first_tokens", ["--skip-first-tokens", "2"], "stats.skip_first_tokens", 2),
        ("out", ["--out", "flag-out"], "out", "flag-out"),
        ("overwrite", ["--overwrite"], "overwrite", True),
        ("resume", ["--resume"], "resume", True),
        *COMMON,
    ],
    "compress": [
        ("model", ["flag-model"], "model.source", "flag-model"),
        ("data", ["--data", "flag-data"], "data.source", "flag-data"),
        ("method", ["--method", "laco"], "select.method", "laco"),
        ("criterion", ["--criterion", "nll"], "select.criterion", "nll"),
        ("search", ["--search", "best-first"], "select.search", "best-first"),
        ("layers", ["--layers", "2"], "select.layers", 2),
        ("merge", ["--merge", "keep-last"], "merge.method", "keep-last"),
        ("compensate", ["--compensate", "lstsq"], "merge.compensate", "lstsq"),
        ("compensate_aware", ["--compensate-aware"], "select.compensate_aware", True),
        ("heal", ["--heal", "local"], "heal.after_compress", "local"),
        ("heal_data", ["--heal-data", "flag-hdata"], "heal.data", "flag-hdata"),
        ("actors", ["--actors", "5"], "ray.actors", 5),
        ("samples", ["--samples", "9"], "data.samples", 9),
        ("seq_len", ["--seq-len", "17"], "data.seq_len", 17),
        ("do_eval", ["--eval"], "eval.enabled", True),
        ("out", ["--out", "flag-out"], "out", "flag-out"),
        ("overwrite", ["--overwrite"], "overwrite", True),
        ("resume", ["--resume"], "resume", True),
        *COMMON,
    ],
    "heal": [
        ("model", ["flag-model"], "model.source", "flag-model"),
        ("data", ["--data", "flag-data"], "heal.data", "flag-data"),
        ("mode", ["--mode", "local"], "heal.mode", "local"),
        ("out", ["--out", "flag-out"], "out", "flag-out"),
        ("workers", ["--workers", "3"], "heal.workers", 3),
        ("steps", ["--steps", "5"], "heal.steps", 5),
        ("epochs", ["--epochs", "1.5"], "heal.epochs", 1.5),
        ("lr", ["--lr", "0.001"], "heal.lr", 0.001),
        ("batch_size", ["--batch-size", "16"], "heal.batch_size", 16),
        ("keep_adapter", ["--keep-adapter"], "heal.keep_adapter", True),
        ("checkpoints", ["--checkpoints", "flag-ckpt"], "heal.checkpoints", "flag-ckpt"),
        ("source", ["--source", "flag-src"], "heal.source", "flag-src"),
        ("do_eval", ["--eval"], "eval.enabled", True),
        ("overwrite", ["--overwrite"], "overwrite", True),
        ("resume", ["--resume"], "resume", True),
        *[c for c in COMMON if c[0] != "gpus_per_actor"],
    ],
    "eval": [
        ("model", ["flag-model"], "model.source", "flag-model"),
        ("baseline", ["--baseline", "flag-base"], "eval.baseline", "flag-base"),
        ("tasks", ["--tasks", "boolq,hellaswag"], "eval.tasks", ["boolq", "hellaswag"]),
        ("limit", ["--limit", "6"], "eval.limit", 6),
        ("batch_size", ["--batch-size", "7"], "eval.batch_size", 7),
        ("ppl_data", ["--ppl-data", "flag.txt"], "eval.ppl_data", "flag.txt"),
        ("ppl_bos", ["--ppl-bos", "chunk"], "eval.ppl_bos", "chunk"),
        ("latency", ["--latency"], "eval.latency", True),
        ("latency_runs", ["--latency-runs", "3"], "eval.latency_runs", 3),
        ("latency_warmup", ["--latency-warmup", "4"], "eval.latency_warmup", 4),
        ("new_tokens", ["--new-tokens", "9"], "eval.latency_new_tokens", 9),
        ("offline", ["--offline"], "eval.offline", True),
        ("actors", ["--actors", "5"], "ray.actors", 5),
        ("device", ["--device", "cuda:1"], "model.device", "cuda:1"),
        ("dtype", ["--dtype", "bfloat16"], "model.dtype", "bfloat16"),
        ("out", ["--out", "flag.json"], "out", "flag.json"),
        *COMMON,
    ],
    "grid": [
        ("models", ["flag-m1", "flag-m2"], "grid.models", ["flag-m1", "flag-m2"]),
        ("data", ["--data", "flag-data"], "data.source", "flag-data"),
        ("criteria", ["--criteria", "output,cka"], "grid.criteria", ["output", "cka"]),
        ("searches", ["--searches", "best-first"], "grid.searches", ["best-first"]),
        ("merges", ["--merges", "reference,paper"], "grid.merges", ["reference", "paper"]),
        ("layers", ["--layers", "2,4"], "grid.layers", [2, 4]),
        ("baselines", ["--baselines", "shortgpt"], "grid.baselines", ["shortgpt"]),
        ("then_width", ["--then-width", "0.1,0.15"], "grid.then_width", [0.1, 0.15]),
        ("compensate", ["--compensate", "lstsq,none"], "grid.compensate", ["lstsq", "none"]),
        ("heal", ["--heal", "none,local"], "grid.heal", ["none", "local"]),
        ("tasks", ["--tasks", "arc_easy"], "eval.tasks", ["arc_easy"]),
        ("limit", ["--limit", "6"], "eval.limit", 6),
        ("concurrency", ["--concurrency", "3"], "grid.concurrency", 3),
        ("cpus_per_trial", ["--cpus-per-trial", "3"], "grid.cpus_per_trial", 3.0),
        ("gpus_per_trial", ["--gpus-per-trial", "1"], "grid.gpus_per_trial", 1.0),
        ("out", ["--out", "flag-out"], "out", "flag-out"),
        ("overwrite", ["--overwrite"], "overwrite", True),
        *COMMON,
    ],
}
# Targets of another kind than the table's (one kind at a time): each replaces the config file's target.
OTHER_TARGETS = {
    "compress": [("threshold", ["--threshold", "0.5"], "select.threshold", 0.5),
                 ("ratio", ["--ratio", "0.2"], "select.ratio", 0.2)],
    "grid": [("ratios", ["--ratios", "0.2,0.3"], "grid.ratios", [0.2, 0.3]),
             ("thresholds", ["--thresholds", "0.7"], "grid.thresholds", [0.7])],
}


def _write(tmp_path: Path, data: dict, name: str = "run.yaml") -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return str(path)


def _click(command: str):
    return typer.main.get_command(app).commands[command]


def _option_names(command: str) -> set[str]:
    return {p.name for p in _click(command).params} - NOT_CONFIG - EXTRA.get(command, set())


def _other_value(value):
    """A YAML value different from the flag's (and valid for the same path)."""
    table = {True: False, "always": "never", "chunk": "stream", "nll": "output", "best-first": "top-down",
             "keep-last": "reference", "linear": "rbf", "bfloat16": "float32", "laco": "shortgpt", "local": "lora",
             "lstsq": "none", "cuda:1": "cuda:2", "2GB": "3GiB"}
    if isinstance(value, bool) or isinstance(value, str) and value in table:
        return table[value]
    if isinstance(value, list):
        return value[:1] if len(value) > 1 else {"best-first": ["top-down"], "shortgpt": ["sleb"],
                                                  "arc_easy": ["piqa"]}.get(value[0], value * 2)
    if isinstance(value, (int, float)):
        return value + 1
    return f"other-{value}"


def _set_args(entries) -> list[str]:
    out = []
    for _, _, path, value in entries:
        text = yaml.safe_dump(_other_value(value), default_flow_style=True).splitlines()[0]
        out += ["--set", f"{path}={text}"]
    return out


@pytest.mark.parametrize("command", ["analyze", "compress", "eval", "grid", "heal", "config"])
def test_every_option_defaults_to_none(command):
    """An option with a default of its own would override the config whenever it is left out."""
    defaults = {p.name: p.default for p in _click(command).params if p.default is not None}
    assert defaults == {}


@pytest.mark.parametrize("command", list(FLAGS))
def test_the_tables_cover_every_option(command):
    covered = {name for name, *_ in FLAGS[command] + OTHER_TARGETS.get(command, [])}
    if command == "compress":
        covered.add("paper")  # test_paper_* below
        covered.add("then_width")  # a fraction below 1: test_width.py::test_cli_depth_then_flap_on_the_merged_model
    assert covered == _option_names(command)


@pytest.mark.parametrize("command", list(FLAGS))
def test_config_values_stand_when_no_flag_is_given(command, capture, tmp_path):
    cfg = invoke(capture, command, "--config", _write(tmp_path, CONFIG))
    assert cfg == build_config(CONFIG)
    if command == "heal":  # heal needs its folder named (tests/test_user_mistakes.py): the default one, here
        assert invoke(capture, command, "--set", f"model.source={RunConfig().model.source}") == RunConfig()
    else:
        assert invoke(capture, command) == RunConfig()  # nothing given: the defaults


@pytest.mark.parametrize("command", list(FLAGS))
def test_precedence_defaults_config_flags_set(command, capture, tmp_path, monkeypatch):
    # every flag at once, so some belong to another method or mode: the refusals of those are tested apart
    # (tests/test_user_mistakes.py)
    monkeypatch.setattr("swm_ray.commands.compress.refuse_ignored_flags", lambda *a, **k: None)
    monkeypatch.setattr("swm_ray.commands.heal.refuse_other_mode_flags", lambda *a, **k: None)
    entries = FLAGS[command]
    flag_args = [a for _, args, _, _ in entries for a in args]
    # the config file holds another value at every flag's path: the flags win
    config = build_config(sets={path: _other_value(value) for _, _, path, value in entries}).model_dump(mode="json")
    cfg = invoke(capture, command, *flag_args, "--config", _write(tmp_path, config))
    for name, _, path, value in entries:
        assert _get(cfg, path) == value, name
    # --set beats the flags
    cfg = invoke(capture, command, *flag_args, *_set_args(entries))
    for name, _, path, value in entries:
        assert _get(cfg, path) == _other_value(value), name


@pytest.mark.parametrize("command, entry", [(c, e) for c, es in OTHER_TARGETS.items() for e in es],
                         ids=lambda x: x if isinstance(x, str) else x[0])
def test_a_target_flag_replaces_the_config_target(command, entry, capture, tmp_path):
    name, args, path, value = entry
    cfg = invoke(capture, command, *args, "--config", _write(tmp_path, CONFIG))  # CONFIG has layers / ratios
    assert _get(cfg, path) == value
    kinds = ("threshold", "ratio", "layers") if command == "compress" else ("thresholds", "ratios", "layers")
    section = "select" if command == "compress" else "grid"
    assert [k for k in kinds if _get(cfg, f"{section}.{k}") not in (None, [])] == [path.split(".")[1]]
    layers = "grid.layers=[3]" if command == "grid" else "select.layers=3"
    res = runner.invoke(app, [command, *args, "--set", layers])
    assert res.exit_code == 2 and "only one" in res.output  # an explicit --set still conflicts


def test_eval_specials(capture, tmp_path):
    cfg = invoke(capture, "eval", "--ppl-data", "none", "--config", _write(tmp_path, CONFIG))
    assert cfg.eval.ppl_data is None  # `none` at flag level: above the file ...
    cfg = invoke(capture, "eval", "--ppl-data", "none", "--set", "eval.ppl_data=x.txt")
    assert cfg.eval.ppl_data == "x.txt"  # ... below --set
    assert invoke(capture, "eval", "--online").eval.offline is False
    assert capture["args"] == (["builtin:smollm2-135m"],) and capture["kwargs"] == {}  # all settings in cfg
    grid_ppl = ROOT / "swm_ray" / "configs" / "grid-smollm2.yaml"
    assert invoke(capture, "eval", "--config", str(grid_ppl)).eval.ppl_bos == "none"  # the example
    assert [report_path(o) for o in (None, "r/e.json", "runs/x", "s3://b/x/")] == [
        "eval.json", "r/e.json", "runs/x/eval.json", "s3://b/x/eval.json"]


def test_eval_report_defaults_to_the_model_folder_and_keeps_another_models_report(capture, tmp_path, monkeypatch):
    """Without --out a local model folder keeps its own eval.json; ./eval.json of another model is not overwritten."""
    folder = tmp_path / "compressed"
    folder.mkdir()
    assert report_path(None, str(folder)) == f"{folder}/eval.json"
    assert report_path(None, "builtin:smollm2-135m") == "eval.json"  # not a folder: the current one
    assert report_path("r/e.json", str(folder)) == "r/e.json"  # --out wins
    monkeypatch.chdir(tmp_path)
    held = '{"model": "runs/other"}'
    (tmp_path / "eval.json").write_text(held)
    res = runner.invoke(app, ["eval", "--tasks", "none"])
    assert res.exit_code == 2 and not isinstance(res.exception, Captured)
    assert "eval.json holds the report of runs/other" in res.output and "--out" in res.output
    assert "Traceback" not in res.output
    assert (tmp_path / "eval.json").read_text() == held  # nothing lost
    invoke(capture, "eval", "--tasks", "none", "--out", "mine.json")  # --out: no refusal, the job runs
    (tmp_path / "eval.json").write_text('{"model": "builtin:smollm2-135m"}')
    invoke(capture, "eval", "--tasks", "none")  # the same model's report: rewritten as before
    (folder / "tokenizer.json").write_text("{}")  # the job is a stub: the folder needs only to pass the pre-check
    (folder / "eval.json").write_text(held)  # a folder's own report (its path written differently, or moved)
    invoke(capture, "eval", str(folder) + "/", "--tasks", "none")  # is rewritten, not refused


def test_grid_resume_is_passed_to_the_job(capture):
    invoke(capture, "grid", "--resume", "exp-folder")
    assert capture["kwargs"] == {"resume": "exp-folder"}


# --- --paper ------------------------------------------------------------------------------------------------


def test_paper_sets_the_authors_procedure(capture, tmp_path):
    cfg = invoke(capture, "compress", "--paper", "--config", _write(tmp_path, CONFIG))
    assert (cfg.select.criterion, cfg.select.search, cfg.select.paper_loop) == ("output", "top-down", True)
    same = invoke(capture, "compress", "--paper", "--criterion", "output", "--search", "top-down",
                  "--set", "select.paper_loop=true")
    assert same.select == cfg.select.model_copy(update={"layers": None})


@pytest.mark.parametrize("extra, named", [
    (["--criterion", "kl"], "--criterion kl"),
    (["--search", "best-first"], "--search best-first"),
    (["--set", "select.criterion=cka"], "--set select.criterion=cka"),
    (["--set", "select.paper_loop=false"], "--set select.paper_loop=false"),
])
def test_paper_refuses_other_explicit_choices(capture, extra, named):
    res = runner.invoke(app, ["compress", "--paper", "--layers", "2", *extra])
    assert res.exit_code == 2 and not capture
    assert len(res.output.strip().splitlines()) == 1 and named in res.output and "--paper" in res.output


# --- shipped configs ----------------------------------------------------------------------------------------


def test_shipped_configs_resolve_by_name(capture):
    from swm_ray.commands.common import shipped_configs

    names = set(shipped_configs())
    assert {"best", "paper", "cka", "grid-smollm2"} <= names
    for name in names - {n for n in names if n.startswith("zoo-")}:  # zoo files go to `swm-ray zoo`
        data = yaml.safe_load((ROOT / "swm_ray" / "configs" / f"{name}.yaml").read_text())
        assert invoke(capture, "compress", "--config", name) == build_config(data)
    res = runner.invoke(app, ["compress", "--config", "nope"])
    assert res.exit_code == 2 and len(res.output.strip().splitlines()) == 1
    configs = {n for n in names if not n.startswith("zoo-")}  # zoo files are listed by `swm-ray zoo`
    assert "nope" in res.output and all(n in res.output for n in configs)
    assert not any(n in res.output for n in names - configs)


def test_a_local_file_of_the_same_name_wins(capture, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("best").write_text("data: {samples: 11}\n")
    assert invoke(capture, "analyze", "--config", "best").data.samples == 11


def test_package_data_ships_the_configs():
    import tomllib

    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["swm_ray"]
    for path in (ROOT / "swm_ray" / "configs").glob("*.yaml"):
        rel = path.relative_to(ROOT / "swm_ray")
        assert any(rel.match(pattern) for pattern in data), rel


# --- `swm-ray config` ---------------------------------------------------------------------------------------


def _fields(model, prefix=""):
    for name, field in type(model).model_fields.items():
        value = getattr(model, name)
        if hasattr(type(value), "model_fields"):
            yield from _fields(value, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", field


def test_every_config_key_has_help():
    assert [path for path, field in _fields(RunConfig()) if not field.description] == []


def test_config_command_prints_the_resolved_tree_with_help(tmp_path):
    res = runner.invoke(app, ["config", _write(tmp_path, {"data": {"samples": 12}}), "--set", "eval.limit=3"])
    assert res.exit_code == 0, res.output
    parsed = yaml.safe_load(res.output)
    assert build_config(parsed) == build_config({"data": {"samples": 12}}, sets={"eval.limit": 3})
    lines = res.output.splitlines()
    samples = next(ln for ln in lines if ln.strip().startswith("samples:"))
    assert "# number of calibration sequences" in samples and "(default: 10)" in samples
    seed = next(ln for ln in lines if ln.strip().startswith("seed:"))
    assert "seed of the calibration sampler" in seed and "default" not in seed  # unchanged: no default note
    for path, field in _fields(RunConfig()):
        key = path.rsplit(".", 1)[-1]
        assert any(ln.strip().startswith(f"{key}:") and field.description in ln for ln in lines), path
    shown = runner.invoke(app, ["config", "paper", "--show-defaults"])
    assert shown.exit_code == 0 and "top-down  # " in shown.output
    assert "(default: 1234)" in shown.output and "shipped configs" in shown.output
    listed = next(ln for ln in shown.output.splitlines() if ln.startswith("# shipped configs"))
    zoos = next(ln for ln in shown.output.splitlines() if ln.startswith("# shipped zoo files"))
    assert "zoo-smollm2" not in listed and "zoo-smollm2" in zoos and "cka" in listed
    cka = runner.invoke(app, ["config", "cka"])
    assert cka.exit_code == 0 and "method: swm" in cka.output and "criterion: cka" in cka.output
    bad = runner.invoke(app, ["config", "--set", "select.nope=1"])
    assert bad.exit_code == 2 and "`swm-ray config` lists the valid keys" in bad.output


def test_cli_start_imports_no_heavy_library():
    code = ("import sys\nfrom typer.testing import CliRunner\nfrom swm_ray.cli import app\n"
            "assert CliRunner().invoke(app, ['--help']).exit_code == 0\n"
            "assert CliRunner().invoke(app, ['config']).exit_code == 0\n"
            "print(sorted(m for m in ('torch', 'ray', 'transformers', 'lm_eval') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# --- README -------------------------------------------------------------------------------------------------


def test_readme_compress_table_names_real_flags():
    text = (ROOT / "README.md").read_text()
    table = text[text.index("### Choices and why"):text.index("### Results")]
    help_text = runner.invoke(app, ["compress", "--help"], terminal_width=300).output
    first_cells = [row.split("|")[1] for row in table.splitlines() if row.startswith("| `")]
    flags = {tok.strip("`,()") for cell in first_cells for tok in cell.split()
             if tok.strip("`,()").startswith("--") and "analyze" not in cell}
    assert flags >= {"--criterion", "--search", "--merge", "--paper"}
    for flag in flags - {"--set"}:
        assert flag in help_text, flag


# --- submit -------------------------------------------------------------------------------------------------


def test_submit_accepts_every_command_and_warns_on_secrets(monkeypatch):
    import swm_ray.jobs.submit as job

    seen = {}
    monkeypatch.setattr(job, "run_submit", lambda address, args, **kw: seen.update(args=args, **kw) or
                        {"job_id": "j", "status": "SUCCEEDED"})
    res = runner.invoke(app, ["submit", "--address", "http://h:8265", "--env", "HF_TOKEN=s3cr3t-value",
                              "--env", "AWS_SECRET_ACCESS_KEY=abc", "--env", "OMP_NUM_THREADS=4", "--", "grid"])
    assert res.exit_code == 0, res.output
    registered = set(typer.main.get_command(app).commands) - {"submit"}
    assert set(seen["commands"]) == registered and {"grid", "config"} <= registered
    assert seen["env"]["HF_TOKEN"] == "s3cr3t-value"  # still passed, as asked
    warnings = [ln for ln in res.output.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 2 and "HF_TOKEN" in warnings[0] and "AWS_SECRET_ACCESS_KEY" in warnings[1]
    assert "s3cr3t" not in res.output and "abc" not in res.output
    for name in registered:
        out = ["--out", "s3://b/o"] if name in job.WRITES else []  # writers: an output that outlives the job
        assert job.entrypoint([name, *out], seen["commands"]) == " ".join(["swm-ray", name, *out])


@pytest.mark.parametrize("key, secret", [
    ("HF_TOKEN", True), ("HUGGING_FACE_HUB_TOKEN", True), ("AWS_SECRET_ACCESS_KEY", True),
    ("AWS_ACCESS_KEY_ID", True), ("AWS_SESSION_TOKEN", True), ("DB_PASSWORD", True), ("OPENAI_API_KEY", True),
    ("MY_APIKEY", True), ("GOOGLE_APPLICATION_CREDENTIALS", True), ("RAY_AUTH_TOKEN", True),
    ("OMP_NUM_THREADS", False), ("SWM_RAY_S3_ENDPOINT", False), ("HF_HOME", False), ("PATH", False),
])
def test_secret_names(key, secret):
    from swm_ray.jobs.submit import looks_secret

    assert looks_secret(key) is secret


def test_eval_checks_its_report_path_first_and_shows_the_numbers_if_the_write_fails(capture, tmp_path, monkeypatch):
    """A report path that cannot be written is refused before any evaluation runs (one line, exit 2); a write
    that fails after the run still prints the table before its one-line error."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("x")
    (tmp_path / "dir.json").mkdir()
    for out, said in (("afile/r/eval.json", "is a file, not a folder"), ("dir.json", "is a folder")):
        capture.clear()
        res = runner.invoke(app, ["eval", "--tasks", "none", "--out", out])
        assert res.exit_code == 2 and said in res.output, res.output
        assert "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1
        assert capture == {}  # refused before the job ran
    result = {"model": "builtin:smollm2-135m", "ppl": {"ppl": 27.6, "data": "t", "chunk": 128}, "params": 1e8}

    def fail(files):
        raise PermissionError(13, "Permission denied", files[-1][0])

    monkeypatch.setitem(sys.modules, "swm_ray.jobs.eval",
                        types.SimpleNamespace(run_eval=lambda cfg, sources: {cfg.model.source: result}))
    monkeypatch.setattr("swm_ray.evaluation.report.write_texts_atomic", fail)
    res = runner.invoke(app, ["eval", "--tasks", "none", "--out", "r.json"])
    assert res.exit_code == 2 and "27.60" in res.output and "Traceback" not in res.output, res.output
    assert "r.json" in res.output.strip().splitlines()[-1] and not (tmp_path / "r.json").exists()


def test_apply_refuses_settings_it_would_not_use(tmp_path):
    """A plan is replayed as written: a --set or --config value apply ignores is refused in one line (it was
    accepted and recorded in the output's config.resolved.yaml as if it had been applied)."""
    for extra in (["--set", "merge.method=mean"], ["--set", "model.dtype=bfloat16"],
                  ["--config", _write(tmp_path, {"merge": {"attention": "bottom"}})]):
        res = runner.invoke(app, ["apply", str(tmp_path / "plan.json"), *extra])
        assert res.exit_code == 2 and "apply does not use" in res.output, res.output
        assert extra[-1].split("=")[0].split(".")[-1] in res.output or "merge.attention" in res.output
        assert "Traceback" not in res.output
    # what apply does read is accepted: the run goes on to the (missing) plan
    res = runner.invoke(app, ["apply", str(tmp_path / "plan.json"), "--set", "model.revision=abc",
                              "--set", "model.allow_pickle=true", "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "apply does not use" not in res.output and "plan.json" in res.output, res.output
