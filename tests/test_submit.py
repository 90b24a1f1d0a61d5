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
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from swm_ray.cli import app
from swm_ray.errors import UserError
from swm_ray.jobs.submit import _token_headers, entrypoint, run_submit

runner = CliRunner()
COMMANDS = ("analyze", "compress", "apply", "eval", "grid", "zoo", "config", "version")


def test_entrypoint_and_argument_errors():
    assert entrypoint(["compress", "my model", "--layers", "6", "-o", "s3://b/m"], COMMANDS) == \
        "swm-ray compress 'my model' --layers 6 -o s3://b/m"
    with pytest.raises(UserError, match="give the swm-ray command"):
        entrypoint(["rm", "-rf"], COMMANDS)
    res = runner.invoke(app, ["submit", "--", "compress"], env={"RAY_ADDRESS": ""})
    assert res.exit_code != 0 and "no cluster address" in res.output
    res = runner.invoke(app, ["submit", "--address", "http://127.0.0.1:9", "--env", "NOEQUALS", "--", "version"])
    assert res.exit_code != 0 and "expected KEY=VALUE" in res.output


def test_a_job_must_write_where_its_output_outlives_it(tmp_path):
    """Ray runs a job in a temporary folder on the head node: a default or relative output is refused before
    anything is submitted; S3, an absolute path, or a --config only the cluster reads pass."""
    for args in (["compress", "m", "--layers", "6"], ["grid", "m", "--out", "runs/g"], ["heal", "m", "-o", "x"],
                 ["eval", "s3://b/m"], ["zoo", "z.yaml", "--set", "out=rel"], ["compress", "--config", "paper"]):
        with pytest.raises(UserError, match="temporary folder on the cluster") as e:
            entrypoint(args, (*COMMANDS, "heal"))
        assert "--out s3://" in str(e.value) and "\n" not in str(e.value)
    local = tmp_path / "run.yaml"
    local.write_text("out: s3://b/run\n")
    for args in (["compress", "m", "--out", "s3://b/m"], ["compress", "m", "--out=/shared/m"], ["grid", "-o/x"],
                 ["compress", "--config", str(local)], ["compress", "--config", "s3://b/run.yaml"], ["version"],
                 ["config", "compress"]):
        entrypoint(args, COMMANDS)
    res = runner.invoke(app, ["submit", "--address", "http://127.0.0.1:9", "--", "compress", "m", "--layers", "6"])
    assert res.exit_code == 2 and "temporary folder" in res.output and "Traceback" not in res.output


def test_the_output_checked_is_the_one_the_job_writes_to():
    """--set out=... wins over --out wherever it stands (as the config's precedence has it), in every spelling of
    --set; and a -c config file is read like --config."""
    for args in (["compress", "m", "--set", "out=runs/rel", "--out", "/abs/keep"],
                 ["eval", "m", "--out", "/abs/keep", "--set=out=runs/rel"],
                 ["compress", "m", "--out", "/abs/keep", "--set", "out = rel"]):
        with pytest.raises(UserError, match="temporary folder on the cluster"):
            entrypoint(args, COMMANDS)
    entrypoint(["compress", "m", "--out", "runs/rel", "--set", "out=/abs/keep"], COMMANDS)


def test_submit_mistakes_name_no_credentials_and_are_one_line(tmp_path):
    res = runner.invoke(app, ["submit", "--address", "http://alice:s3cr3t@127.0.0.1:9", "--", "version"])
    assert res.exit_code == 2 and "s3cr3t" not in res.output and "127.0.0.1:9" in res.output, res.output
    res = runner.invoke(app, ["submit", "--address", "http://127.0.0.1:9", "--working-dir", str(tmp_path / "none"),
                              "--", "version"])
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert res.exit_code == 2 and len(lines) == 1 and "--working-dir" in lines[0], res.output


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
        for name in ("dashboard.log", "dashboard_agent.log"):
            dash = Path(session) / "logs" / name
            if dash.exists():
                text += f"\n--- {dash} (tail) ---\n" + "\n".join(dash.read_text(errors="replace").splitlines()[-30:])
    return text[-8000:]


# Ray's failure detectors assume an idle machine. On a shared host (a CI runner, or these 2 cores with other Ray
# jobs, load ~5) the GCS's health checks of the raylet, a worker's registration or a GCS call miss their
# deadlines, and Ray declares its only, healthy node dead: the grid inside the job then fails with "Owner's node
# has crashed". The head gets the slack a loaded machine needs (Ray 2.60's names). A node that really dies
# still fails the test: its raylet's and workers' connections break at once, whatever these timeouts say.
LOADED_MACHINE_CONFIG = {  # RayConfig, through the head's `_system_config`: GCS, raylet, workers, job drivers
    "health_check_initial_delay_ms": 30_000,  # default 5 s
    "health_check_period_ms": 10_000,  # default 3 s
    "health_check_timeout_ms": 30_000,  # default 10 s
    "health_check_failure_threshold": 10,  # default 5: a node is dead after ~100-400 s without an answer
    "gcs_rpc_server_reconnect_timeout_s": 300,  # default 60: how long a raylet or worker waits for the GCS
    "worker_register_timeout_seconds": 300,  # default 60: a worker process starting on a busy machine
}
LOADED_MACHINE_ENV = {  # read by Ray's Python side (head start-up, dashboard, GCS client calls), inherited by jobs
    "RAY_gcs_server_request_timeout_seconds": "300",  # default 60
    "RAY_gcs_server_port_wait_time_s": "120",  # default 30
    "RAY_DASHBOARD_STARTUP_TIMEOUT_S": "300",  # default 60
    "RAY_DASHBOARD_GCS_RPC_TIMEOUT_SECONDS": "180",  # default 60
}
HEAD_START_S = 300  # the head and its job server up (about 10 s on an idle machine, 30-45 s at load ~20)
# The head in a child process. Every Ray node's dashboard agent listens on 52365 unless told otherwise, and
# `ray.init` cannot tell it: with another Ray already on the machine the agent's HTTP server is disabled ("address
# already in use") and the job server answers "No available agent" forever. The head gets free ports of its own.
HEAD_SCRIPT = """
import json, signal, sys
import ray
from ray._private import parameter
from ray._private.state import state

dashboard_port, agent_port, system_config = int(sys.argv[1]), int(sys.argv[2]), json.loads(sys.argv[3])


class HeadParams(parameter.RayParams):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("dashboard_agent_listen_port", agent_port)
        super().__init__(*args, **kwargs)


parameter.RayParams = HeadParams  # what ray.init builds its node from
ctx = ray.init(address="local", num_cpus=1, include_dashboard=True, dashboard_host="127.0.0.1",
               dashboard_port=dashboard_port, _system_config=system_config)
print("SYSTEM_CONFIG=" + json.dumps(state.get_system_config()), flush=True)
print("SESSION=" + ctx.address_info["session_dir"], flush=True)
signal.pause()
"""


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=2)
    except urllib.error.HTTPError:  # answering (e.g. 401 without a token, 404) is up
        pass
    except OSError:
        return False
    return True


def _head_ready(url: str, log: Path) -> bool:
    """The head process is through `ray.init` and its dashboard (the job server) answers."""
    return "SESSION=" in log.read_text(errors="replace") and _answers(url + "/api/version")


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    import json

    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", **LOADED_MACHINE_ENV}
    port, agent_port = _free_port(), _free_port()
    log = tmp_path_factory.mktemp("ray-head") / "head.log"
    # an embedded head with a dashboard (the job server) in a child process: stopping the child shuts down
    # exactly this cluster and leaves any other Ray on the machine alone
    argv = [sys.executable, "-c", HEAD_SCRIPT, str(port), str(agent_port), json.dumps(LOADED_MACHINE_CONFIG)]
    with open(log, "wb") as out:
        head = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + HEAD_START_S
    while time.monotonic() < deadline and head.poll() is None:
        if _head_ready(url, log):
            break
        time.sleep(1)
    else:
        # a head or job server that does not come up is a failure, not a reason to skip
        exited = head.poll()
        head.terminate()
        head.wait(timeout=60)
        why = f"exited with code {exited}" if exited is not None else f"did not answer within {HEAD_START_S} s"
        pytest.fail(f"local Ray head at {url} {why}; its log:\n{_head_log(log)}", pytrace=False)
    yield SimpleNamespace(url=url, log=log, agent_port=agent_port)
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
def test_head_runs_with_the_slack_of_a_loaded_machine(ray_head):
    """The cluster's own record of its configuration holds the slack (a renamed key would not), and its job
    agent serves on the head's own port (not on 52365, which another Ray on the machine may hold)."""
    import json

    line = next(ln for ln in ray_head.log.read_text().splitlines() if ln.startswith("SYSTEM_CONFIG="))
    config = json.loads(line.split("=", 1)[1])
    assert {k: config.get(k) for k in LOADED_MACHINE_CONFIG} == LOADED_MACHINE_CONFIG
    deadline = time.monotonic() + HEAD_START_S  # the agent's HTTP server answers on the head's port
    while not _answers(f"http://127.0.0.1:{ray_head.agent_port}/") and time.monotonic() < deadline:
        time.sleep(1)
    assert _answers(f"http://127.0.0.1:{ray_head.agent_port}/"), _head_log(ray_head.log)


@pytest.mark.cluster
def test_submit_runs_a_job_and_streams_its_logs(ray_head, capsys):
    if shutil.which("swm-ray") is None and not (Path(sys.executable).parent / "swm-ray").exists():
        pytest.skip("swm-ray entry point not installed")
    res = run_submit(ray_head.url, ["version"], commands=COMMANDS,
                     env={"PATH": str(Path(sys.executable).parent) + ":" + os.environ["PATH"]}, timeout_s=120,
                     ready_s=HEAD_START_S)
    assert res["status"] == "SUCCEEDED"
    import swm_ray

    assert swm_ray.__version__ in capsys.readouterr().out


@pytest.mark.cluster
def test_an_unknown_job_id_is_one_line(ray_head):
    for flag in ("--status", "--stop"):
        res = runner.invoke(app, ["submit", "--address", ray_head.url, flag, "raysubmit_nosuchjob"])
        lines = [line for line in res.output.splitlines() if line.strip()]
        assert res.exit_code == 2 and len(lines) == 1 and "raysubmit_nosuchjob" in lines[0], res.output


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
    url = ray_head.url
    grid = run_submit(url, ["grid", str(tiny_llama_dir), "--criteria", "none", "--baselines", "shortgpt",
                            "--layers", "1", "--tasks", "none", "--set", "eval.ppl_data=null", *data,
                            "--out", str(tmp_path / "grid")], commands=COMMANDS, env=_job_env(), timeout_s=600,
                      ready_s=HEAD_START_S)
    assert grid["status"] == "SUCCEEDED", capsys.readouterr().out[-3000:]
    table = (tmp_path / "grid" / "results.md").read_text()
    assert "shortgpt" in table and any((tmp_path / "grid" / "plans").glob("*.json"))
    zoo = tmp_path / "zoo.yaml"
    zoo.write_text(yaml.safe_dump({
        "defaults": {"data": {"source": str(tokens_parquet), "samples": 16, "seq_len": 16, "batch_size": 4},
                     "select": {"layers": 1, "method": "shortgpt"}, "eval": {"tasks": [], "ppl_data": None}},
        "models": [{"source": str(tiny_llama_dir), "name": "tiny"}]}))
    res = run_submit(url, ["zoo", str(zoo), "--out", str(tmp_path / "zoo")], commands=COMMANDS,
                     env=_job_env(), timeout_s=600, ready_s=HEAD_START_S)
    assert res["status"] == "SUCCEEDED", capsys.readouterr().out[-3000:]
    manifest = json.loads((tmp_path / "zoo" / "manifest.json").read_text())
    assert [(r["name"], r["status"]) for r in manifest] == [("tiny", "ok")]
