"""`swm-ray submit` against a real local Ray head (dashboard + job server on loopback)."""

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from typer.testing import CliRunner

from swm_ray.cli import app
from swm_ray.errors import UserError
from swm_ray.jobs.submit import _token_headers, entrypoint, run_submit

runner = CliRunner()
COMMANDS = ("analyze", "compress", "apply", "eval", "grid", "zoo", "config", "version")


def test_entrypoint_and_argument_errors():
    assert entrypoint(["compress", "my model", "--layers", "6"], COMMANDS) == "swm-ray compress 'my model' --layers 6"
    with pytest.raises(UserError, match="give the swm-ray command"):
        entrypoint(["rm", "-rf"], COMMANDS)
    res = runner.invoke(app, ["submit", "--", "compress"], env={"RAY_ADDRESS": ""})
    assert res.exit_code != 0 and "no cluster address" in res.output
    res = runner.invoke(app, ["submit", "--address", "http://127.0.0.1:9", "--env", "NOEQUALS", "--", "version"])
    assert res.exit_code != 0 and "expected KEY=VALUE" in res.output


def test_token_header_comes_from_env_then_path_then_home(tmp_path, monkeypatch):
    """The client sends the cluster token itself, whatever Ray decided about auth earlier in this process."""
    for k in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert _token_headers() == {}
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("home-token\n")
    assert _token_headers() == {"Authorization": "Bearer home-token"}
    (tmp_path / "t").write_text("path-token")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "t"))
    assert _token_headers() == {"Authorization": "Bearer path-token"}
    monkeypatch.setenv("RAY_AUTH_TOKEN", "env-token")
    assert _token_headers() == {"Authorization": "Bearer env-token"}


def _head_log(log: Path) -> str:
    """The head process's own output, then the tail of its dashboard (job server) log when it got that far."""
    text = log.read_text(errors="replace") if log.exists() else ""
    session = next((ln.split("=", 1)[1].strip() for ln in text.splitlines() if ln.startswith("SESSION=")), None)
    if session:
        dash = Path(session) / "logs" / "dashboard.log"
        if dash.exists():
            text += f"\n--- {dash} (tail) ---\n" + "\n".join(dash.read_text(errors="replace").splitlines()[-40:])
    return text[-6000:]


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    port = 28265
    log = tmp_path_factory.mktemp("ray-head") / "head.log"
    # an embedded head with a dashboard (the job server) in a child process: stopping the child shuts down
    # exactly this cluster and leaves any other Ray on the machine alone
    script = ("import signal, ray; ctx = ray.init(address='local', num_cpus=1, include_dashboard=True, "
              f"dashboard_host='127.0.0.1', dashboard_port={port}); "
              "print('SESSION=' + ctx.address_info['session_dir'], flush=True); signal.pause()")
    with open(log, "wb") as out:
        head = subprocess.Popen([sys.executable, "-c", script], stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and head.poll() is None:
        try:
            urllib.request.urlopen(url + "/api/version", timeout=2)
            break
        except urllib.error.HTTPError:  # answering (e.g. 401 without a token) is up
            break
        except OSError:
            time.sleep(1)
    else:
        # a head or job server that does not come up is a failure, not a reason to skip
        exited = head.poll()
        head.terminate()
        head.wait(timeout=60)
        why = f"exited with code {exited}" if exited is not None else "did not answer within 90 s"
        pytest.fail(f"local Ray head at {url} {why}; its log:\n{_head_log(log)}", pytrace=False)
    yield url
    head.send_signal(signal.SIGINT)  # ray.init's exit hook shuts the embedded cluster down
    try:
        head.wait(timeout=180)  # slow on a loaded machine; what the tests checked is already decided
    except subprocess.TimeoutExpired:
        head.terminate()
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            head.kill()
            head.wait(timeout=30)


@pytest.mark.cluster
def test_submit_runs_a_job_and_streams_its_logs(ray_head, capsys):
    if shutil.which("swm-ray") is None and not (Path(sys.executable).parent / "swm-ray").exists():
        pytest.skip("swm-ray entry point not installed")
    res = run_submit(ray_head, ["version"], commands=COMMANDS,
                     env={"PATH": str(Path(sys.executable).parent) + ":" + os.environ["PATH"]}, timeout_s=120)
    assert res["status"] == "SUCCEEDED"
    import swm_ray

    assert swm_ray.__version__ in capsys.readouterr().out


def _job_env() -> dict[str, str]:
    return {"PATH": str(Path(sys.executable).parent) + ":" + os.environ["PATH"], "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1", "SWM_RAY_CACHE": os.environ.get("SWM_RAY_CACHE", "")}


@pytest.mark.cluster
def test_submit_runs_a_grid_and_a_zoo(ray_head, tiny_llama_dir, tokens_parquet, tmp_path, capsys):
    """`grid` and `zoo` as Ray jobs on a running cluster (the job's driver joins it through RAY_ADDRESS)."""
    import json

    import yaml

    data = ["--set", f"data.source={tokens_parquet}", "--set", "data.samples=16", "--set", "data.seq_len=16",
            "--set", "data.batch_size=4"]
    grid = run_submit(ray_head, ["grid", str(tiny_llama_dir), "--criteria", "none", "--baselines", "shortgpt",
                                 "--layers", "1", "--tasks", "none", "--set", "eval.ppl_data=null", *data,
                                 "--out", str(tmp_path / "grid")], commands=COMMANDS, env=_job_env(), timeout_s=600)
    assert grid["status"] == "SUCCEEDED", capsys.readouterr().out[-3000:]
    table = (tmp_path / "grid" / "results.md").read_text()
    assert "shortgpt" in table and any((tmp_path / "grid" / "plans").glob("*.json"))
    zoo = tmp_path / "zoo.yaml"
    zoo.write_text(yaml.safe_dump({
        "defaults": {"data": {"source": str(tokens_parquet), "samples": 16, "seq_len": 16, "batch_size": 4},
                     "select": {"layers": 1, "method": "shortgpt"}, "eval": {"tasks": [], "ppl_data": None}},
        "models": [{"source": str(tiny_llama_dir), "name": "tiny"}]}))
    res = run_submit(ray_head, ["zoo", str(zoo), "--out", str(tmp_path / "zoo")], commands=COMMANDS,
                     env=_job_env(), timeout_s=600)
    assert res["status"] == "SUCCEEDED", capsys.readouterr().out[-3000:]
    manifest = json.loads((tmp_path / "zoo" / "manifest.json").read_text())
    assert [(r["name"], r["status"]) for r in manifest] == [("tiny", "ok")]
