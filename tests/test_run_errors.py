"""Failed and resumed runs: a user mistake found in an actor reaches the CLI as one line, a run that fails before
it holds any work leaves no state behind, and a resume is refused when it would compute in another precision
but accepted when only how the run computes changed (actors, memory budget, streaming, device)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from swm_ray.cli import app
from swm_ray.config import build_config
from swm_ray.errors import RunError, UserError
from swm_ray.io.runstate import SUFFIX, RunState, fingerprint, resume_fingerprint
from swm_ray.jobs.analyze import run_analyze

runner = CliRunner()
ROWS = ["--samples", "8", "--seq-len", "16", "--batch-size", "4"]


def _cli(*args) -> tuple[int, str]:
    res = runner.invoke(app, [*map(str, args)])
    return res.exit_code, res.output


def _one_error_line(output: str) -> str:
    """The run's only `error:` line; no traceback anywhere."""
    errors = [ln for ln in output.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, output[-3000:]
    assert "Traceback" not in output and 'File "' not in output and "ray::" not in output, output[-3000:]
    return errors[0]


def _partial(out: Path) -> Path:
    return out.with_name(f".{out.name}{SUFFIX}")


def _cfg(model, data, out, **flags):
    base = {"model.source": str(model), "data.source": str(data), "data.samples": 16, "data.seq_len": 16,
            "data.batch_size": 4, "out": str(out), "ray.actors": 1, "model.stream": "never"}
    return build_config(flags={**base, **flags})


# -- a user mistake crosses the actor boundary as one line -------------------------------------------------------


def test_budget_below_one_layer_is_one_line_and_the_corrected_run_needs_no_resume(ray_session, tiny_llama_dir,
                                                                                   tokens_parquet, tmp_path):
    out = tmp_path / "out"
    code, output = _cli("analyze", tiny_llama_dir, "--data", tokens_parquet, *ROWS, "--max-memory", "1KB",
                        "--out", out)
    line = _one_error_line(output)
    assert code == 2 and "even one layer at a time" in line and "--max-memory" in line
    assert "loading the model" not in output  # checked on the driver, before any actor started
    assert not out.exists() and not _partial(out).exists()
    code, output = _cli("analyze", tiny_llama_dir, "--data", tokens_parquet, *ROWS, "--max-memory", "1MB",
                        "--out", out)
    assert code == 0, output[-3000:]
    assert (out / "similarity.npy").exists() and not _partial(out).exists()


def _mismatched_keys(src: Path, dst: Path) -> Path:
    """A copy of `src` whose layer 0 has a tensor under a name its architecture does not have: found only by an
    actor that streams the model (the driver reads no layer names)."""
    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    name = next(k for k in tensors if ".layers.0." in k and k.endswith("up_proj.weight"))
    tensors[name.replace("up_proj", "upper_proj")] = tensors.pop(name)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_user_error_found_in_an_actor_is_one_line_and_leaves_no_state(ray_session, tiny_llama_dir, tokens_parquet,
                                                                     tmp_path):
    broken = _mismatched_keys(tiny_llama_dir, tmp_path / "broken")
    out = tmp_path / "out"
    code, output = _cli("analyze", broken, "--data", tokens_parquet, *ROWS, "--stream-layers", "--out", out)
    line = _one_error_line(output)
    assert code == 2 and line.startswith(f"error: model {broken}") and "do not match the architecture" in line
    assert not out.exists() and not _partial(out).exists()
    code, output = _cli("analyze", tiny_llama_dir, "--data", tokens_parquet, *ROWS, "--stream-layers", "--out", out)
    assert code == 0, output[-3000:]


def _test_actors():
    """Actors defined here (pickled by value): one whose method raises what it is told, one whose __init__ does."""
    import ray

    @ray.remote(num_cpus=0)
    class Raiser:
        def fail(self, error):
            raise error

    @ray.remote(num_cpus=0, max_restarts=0)
    class BadInit:
        def __init__(self, error):
            raise error

        def info(self):
            return "unreachable"

    return Raiser, BadInit


def test_user_errors_cross_the_actor_boundary_as_themselves(ray_session):
    import ray

    from swm_ray.jobs.pool import _get

    Raiser, BadInit = _test_actors()
    raiser = Raiser.remote()
    created = [raiser]
    try:
        with pytest.raises(UserError) as e:
            _get(raiser.fail.remote(UserError("--samples 3: too few rows; give at least 4", 3)), None, 0)
        assert type(e.value) is UserError and str(e.value) == "--samples 3: too few rows; give at least 4"
        assert e.value.exit_code == 3
        with pytest.raises(RunError) as e:
            _get(raiser.fail.remote(RunError("the cluster lost its GPUs: add nodes")), None, 0)
        assert type(e.value) is RunError and e.value.exit_code == 1
        with pytest.raises(ray.exceptions.RayTaskError):  # not a user mistake: Ray's error as it was
            _get(raiser.fail.remote(ValueError("a bug")), None, 0)
        for error, kind, text in [(UserError("model m: unreadable config; give a folder"), UserError,
                                   "model m: unreadable config; give a folder"),
                                  (ValueError("a bug in __init__"), RunError,
                                   "actor 0 could not start: ValueError: a bug in __init__")]:
            actor = BadInit.remote(error)
            created.append(actor)
            with pytest.raises(kind) as e:
                _get(actor.info.remote(), None, 0)
            assert type(e.value) is kind and str(e.value) == text
    finally:
        for a in created:
            ray.kill(a)


def test_the_cli_prints_a_wrapped_user_error_as_one_line(ray_session, capsys):
    import ray
    import typer

    from swm_ray.commands.common import user_errors

    Raiser, _ = _test_actors()
    raiser = Raiser.remote()
    try:
        with pytest.raises(typer.Exit) as e:
            user_errors(lambda: ray.get(raiser.fail.remote(UserError("--actors 9: more than the rows", 2))))()
    finally:
        ray.kill(raiser)
    assert e.value.exit_code == 2
    assert capsys.readouterr().err == "error: --actors 9: more than the rows\n"


# -- what a resume compares ---------------------------------------------------------------------------------------


def test_fingerprints_leave_out_how_a_run_computes():
    base = {"model.source": "/m", "data.source": "/d.parquet", "data.samples": 16, "select.layers": 2}
    cfg = build_config(flags=base)
    # the settings fingerprint of earlier releases (zoo entries and plan.json keep it): unchanged
    assert fingerprint(cfg) == "c7ef15a7f80a0edcab26"
    assert fingerprint(build_config(flags={**base, "model.dtype": "bfloat16"})) == "c094b90d1e682d627bbe"
    runs_only = {"model.max_memory": "3GB", "model.stream": "always", "model.device": "cpu", "ray.actors": 4,
                 "ray.gpus_per_actor": 2, "ray.cpus_per_actor": 3, "ray.address": "auto", "ray.max_restarts": 0,
                 "ray.call_timeout_s": 60, "ray.placement_timeout_s": 5, "ray.threads_per_actor": 2}
    for key, value in runs_only.items():
        other = build_config(flags={**base, key: value})
        assert fingerprint(other) == fingerprint(cfg), key
        assert resume_fingerprint(other) == resume_fingerprint(cfg), key
    # the dtype is compared as computed (the state's "dtype"), so auto and float32 continue each other
    assert resume_fingerprint(build_config(flags={**base, "model.dtype": "float32"})) == resume_fingerprint(cfg)
    for key, value in {"data.samples": 32, "select.layers": 3, "model.revision": "main", "stats.kernel": "rbf"}.items():
        assert resume_fingerprint(build_config(flags={**base, key: value})) != resume_fingerprint(cfg), key


def test_state_is_written_with_the_first_work_only(tmp_path):
    cfg = build_config(flags={"model.source": "/m", "data.source": "/d.parquet", "out": str(tmp_path / "o")})
    calib = np.arange(12).reshape(3, 4)
    state = RunState.open(cfg.out, "analyze", cfg, False, dtype="float32")
    state.start(calib)
    assert not Path(state.root).exists()  # nothing worth resuming yet
    state.save_array("hsic-0.npy", np.ones((2, 2)))
    saved = json.loads((Path(state.root) / "state.json").read_text())
    assert saved["dtype"] == "float32" and saved["kind"] == "analyze"
    np.testing.assert_array_equal(np.load(Path(state.root) / "calibration.npy"), calib)
    with pytest.raises(UserError, match="add --resume"):
        RunState.open(cfg.out, "analyze", cfg, False, dtype="float32")
    resumed = RunState.open(cfg.out, "analyze", cfg, True, dtype="float32")
    resumed.start(calib)
    assert resumed.load_array("hsic-0.npy") is not None
    with pytest.raises(UserError) as e:
        RunState.open(cfg.out, "analyze", cfg, True, dtype="bfloat16")
    assert str(e.value) == (f"--resume: the interrupted run computed in float32, this one would compute in bfloat16: "
                            f"pass --set model.dtype=float32 to continue it, or remove {state.root} to start again")
    # files of a run that died before its state.json was written are not a state: a fresh run clears them
    (Path(state.root) / "state.json").unlink()
    fresh = RunState.open(cfg.out, "analyze", cfg, False, dtype="float32")
    assert not Path(fresh.root).exists()


def test_a_state_of_the_earlier_release_still_resumes(tmp_path):
    """Its state.json has no dtype and the settings fingerprint (which hashes an explicit model.dtype)."""
    cfg = build_config(flags={"model.source": "/m", "data.source": "/d.parquet", "model.dtype": "float32",
                              "out": str(tmp_path / "o")})
    root = Path(RunState(cfg.out, "compress", "").root)
    root.mkdir()
    (root / "state.json").write_text(json.dumps({"kind": "compress", "fingerprint": fingerprint(cfg)}))
    np.save(root / "calibration.npy", np.arange(4).reshape(1, 4))
    state = RunState.open(cfg.out, "compress", cfg, True, dtype="float32")
    state.start(np.arange(4).reshape(1, 4))
    assert json.loads((root / "state.json").read_text())["dtype"] == "float32"


class Stopped(Exception):
    pass


def _interrupt_after_first_minibatch(monkeypatch):
    """Make the next run save one minibatch of statistics, then stop as a killed driver would."""
    saved = RunState.save_array
    calls = []

    def save_once(self, name, arr):
        if calls:
            raise Stopped
        calls.append(name)
        saved(self, name, arr)

    monkeypatch.setattr(RunState, "save_array", save_once)
    return lambda: monkeypatch.setattr(RunState, "save_array", saved)


def test_resume_in_another_precision_is_refused_and_other_run_settings_are_accepted(
        ray_session, tiny_llama_dir, tokens_parquet, tmp_path, monkeypatch):
    import swm_ray.jobs.runtime as runtime

    want = run_analyze(_cfg(tiny_llama_dir, tokens_parquet, tmp_path / "clean"))
    out = tmp_path / "run"
    restore = _interrupt_after_first_minibatch(monkeypatch)
    with pytest.raises(Stopped):
        run_analyze(_cfg(tiny_llama_dir, tokens_parquet, out))
    restore()
    state = json.loads((_partial(out) / "state.json").read_text())
    assert state["dtype"] == "float32" and len(list(_partial(out).glob("hsic-*.npy"))) == 1
    monkeypatch.setattr(runtime, "actors_get_gpus", lambda cfg: True)  # resumed where actors get GPUs: bf16
    with pytest.raises(UserError) as e:
        run_analyze(_cfg(tiny_llama_dir, tokens_parquet, out, resume=True))
    assert str(e.value).startswith("--resume: the interrupted run computed in float32, this one would compute in "
                                   "bfloat16: pass --set model.dtype=float32 to continue it, or remove ")
    assert "\n" not in str(e.value)
    got = run_analyze(_cfg(tiny_llama_dir, tokens_parquet, out, resume=True, **{
        "model.dtype": "float32", "ray.actors": 2, "model.max_memory": "64MB", "ray.gpus_per_actor": 2}))
    assert got["minibatches"] == want["minibatches"] == 4
    np.testing.assert_allclose(np.load(out / "similarity.npy"), np.load(tmp_path / "clean" / "similarity.npy"),
                               atol=1e-9, rtol=0)
    assert not _partial(out).exists()


def test_resume_refuses_a_model_folder_rewritten_since_the_run_started(tmp_path):
    """The settings name a local model by its path; a folder rewritten in place (e.g. `compress --overwrite`
    into it) is another model, so its saved scores and sums are not continued. A heal's fingerprint (which
    names its checkpoints) changes the same way."""
    import time

    from tiny_models import tiny_model

    from swm_ray.jobs.heal import fingerprint as heal_fingerprint

    folder = tmp_path / "m"
    tiny_model("llama", n_layers=4, seed=0)[0].save_pretrained(folder)
    cfg = build_config(flags={"model.source": str(folder), "data.source": "/d.parquet", "out": str(tmp_path / "o")})
    calib = np.arange(12).reshape(3, 4)
    state = RunState.open(cfg.out, "compress", cfg, False, dtype="float32")
    state.start(calib)
    state.save_json("memo.json", {})
    healed = heal_fingerprint(cfg)
    RunState.open(cfg.out, "compress", cfg, True, dtype="float32")  # the same folder: continues
    time.sleep(0.01)
    tiny_model("llama", n_layers=4, seed=1)[0].save_pretrained(folder)
    with pytest.raises(UserError, match="was rewritten since the interrupted run started") as e:
        RunState.open(cfg.out, "compress", cfg, True, dtype="float32")
    assert "\n" not in str(e.value)
    assert heal_fingerprint(cfg) != healed


def test_a_run_killed_while_writing_its_first_work_is_still_told_to_resume(tmp_path, monkeypatch):
    """The state's mark is written before the first work file: a run killed between the two leaves a state the
    next run refuses to remove without --resume (and --resume continues it, with nothing to replay), never a work
    file without its mark, which a fresh run would silently delete."""
    cfg = build_config(flags={"model.source": "/m", "data.source": "/d.parquet", "out": str(tmp_path / "o")})
    calib = np.arange(12).reshape(3, 4)
    state = RunState.open(cfg.out, "compress", cfg, False, dtype="float32")
    state.start(calib)
    real = RunState._replace

    def killed_at_the_work(self, name, data):
        if name == "memo.json":
            raise KeyboardInterrupt  # the process dies here
        real(self, name, data)

    monkeypatch.setattr(RunState, "_replace", killed_at_the_work)
    with pytest.raises(KeyboardInterrupt):
        state.save_json("memo.json", {"checks": [1, 2, 3]})
    monkeypatch.setattr(RunState, "_replace", real)
    with pytest.raises(UserError, match="add --resume"):
        RunState.open(cfg.out, "compress", cfg, False, dtype="float32")
    resumed = RunState.open(cfg.out, "compress", cfg, True, dtype="float32")
    resumed.start(calib)
    assert resumed.load_json("memo.json") is None
