"""`swm-ray submit`: run an swm-ray command on a Ray cluster through the Ray Jobs API."""

from __future__ import annotations

import asyncio
import re
import shlex
import sys
import time
from collections.abc import Collection
from pathlib import Path

from swm_ray.errors import UserError
from swm_ray.io.faults import without_userinfo

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
SECRET_WORDS = ("TOKEN", "SECRET", "PASSWORD", "PASSWD", "PASSPHRASE", "CREDENTIAL", "PRIVATE")  # inside a word
SECRET_PARTS = {"PASS", "PAT"}  # whole words; any word ending in KEY counts too (AWS_ACCESS_KEY_ID, APIKEY)


def entrypoint(args: list[str], commands: Collection[str]) -> str:
    """The job's shell command: `swm-ray ARGS`, ARGS[0] one of `commands` (the CLI's own, given by the caller;
    the job's driver joins the cluster through RAY_ADDRESS)."""
    if not args or args[0] not in commands:
        raise UserError(f"submit: give the swm-ray command to run, one of {', '.join(commands)} "
                        f"(e.g. swm-ray submit --address URL -- compress MODEL --layers 6 --out s3://BUCKET/m)")
    check_job_output(args)
    return shlex.join(["swm-ray", *args])


WRITES = ("analyze", "compress", "apply", "eval", "grid", "zoo", "heal")
"""Commands that write an output folder or report (their default and relative paths are relative to the job's
working folder on the cluster, which Ray deletes)."""


def job_output(args: list[str]) -> str | None:
    """The output path a command line gives (--out/-o, --out=X, -oX, --set out=X; else a local --config file's
    `out:`), None when it gives none, "" when a --config only the cluster can read might."""
    import yaml

    out, config, set_out = None, None, None
    for i, a in enumerate(args):
        nxt = args[i + 1] if i + 1 < len(args) else None
        if a in ("--out", "-o") and nxt is not None:
            out = nxt
        elif a.startswith("--out="):
            out = a.split("=", 1)[1]
        elif a.startswith("-o") and not a.startswith("--") and len(a) > 2:
            out = a[2:]
        elif (a == "--set" and nxt is not None) or a.startswith("--set="):
            key, sep, value = (nxt if a == "--set" else a.split("=", 1)[1]).partition("=")
            if sep and key.strip() == "out":
                set_out = value.strip()  # as `parse_set` reads it
        elif a in ("--config", "-c") and nxt is not None:
            config = nxt
    if set_out is not None:  # --set comes last in a config's precedence, wherever it stands on the line
        out = set_out
    if out is None and config is not None:
        local = Path(config).expanduser()
        if local.is_file():
            try:
                data = yaml.safe_load(local.read_text())
            except (OSError, yaml.YAMLError):
                data = None
            if isinstance(data, dict) and data.get("out"):
                out = str(data["out"])
        elif "://" in config or "/" in config or config.endswith((".yaml", ".yml")):
            out = ""  # a file the cluster reads: its `out` cannot be seen from here
        # else a shipped config's name: none of them sets `out`
    return out


def check_job_output(args: list[str]) -> None:
    """A job's output must outlive the job: on S3 or at an absolute path (a volume the cluster keeps). A default
    or relative output lands in the job's temporary folder on the head node and is lost."""
    if args[0] not in WRITES:
        return
    out = job_output(args)
    if out == "":  # a --config the cluster reads: its out is not visible here
        return
    from swm_ray.io.remote import is_remote

    if out is None or not (is_remote(out) or out.startswith("/")):
        given = "no --out" if out is None else f"--out {out} is relative"
        raise UserError(f"submit: {given}: {args[0]} would write into the job's temporary folder on the cluster, "
                        f"deleted after the job; give --out s3://BUCKET/PATH (or an absolute path on storage the "
                        f"cluster keeps)")


def looks_secret(key: str) -> bool:
    """Whether an environment variable's name suggests a credential (HF_TOKEN, AWS_SECRET_ACCESS_KEY, ...)."""
    words = [w for w in re.split(r"[^A-Z0-9]+", key.upper()) if w]
    return any(any(s in w for s in SECRET_WORDS) or w in SECRET_PARTS or w.endswith("KEY") for w in words)


def secret_keys(env: dict[str, str]) -> list[str]:
    """The keys of `env` that look like credentials (their values are never looked at)."""
    return [k for k in env if looks_secret(k)]


def _token_headers() -> dict[str, str]:
    """The cluster token as an explicit Authorization header: RAY_AUTH_TOKEN, else the file RAY_AUTH_TOKEN_PATH
    names, else ~/.ray/auth_token (where `ray start` and a local `ray.init` write it). Passed explicitly
    because Ray's own client decides once per process whether to send one, and a process that touched Ray
    before the token existed would send none. Clusters without token authentication ignore the header."""
    import os
    from pathlib import Path

    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if not token:
        path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token").expanduser()
        try:
            token = path.read_text().strip()
        except OSError:
            token = ""
    return {"Authorization": f"Bearer {token}"} if token else {}


def _client(address: str):
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address, headers=_token_headers())
    except AuthenticationError:
        raise UserError(f"the Ray cluster at {without_userinfo(address)} requires a token: set RAY_AUTH_TOKEN (or "
                        f"RAY_AUTH_TOKEN_PATH) to the cluster's token") from None
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise UserError(f"cannot reach the Ray cluster at {without_userinfo(address)}: "
                        f"{without_userinfo(str(e).splitlines()[0][:160])}") from None


def _asked(what: str, call):
    """A Jobs API call whose refusal (an unknown job id: Ray's RuntimeError of a 404) is one line."""
    try:
        return call()
    except RuntimeError as e:
        raise UserError(f"{what}: {without_userinfo(str(e).splitlines()[0][:200])}") from None


def runtime_env(working_dir: str | None, pip: list[str] | None, env: dict[str, str]) -> dict:
    renv: dict = {"env_vars": {"RAY_USAGE_STATS_ENABLED": "0", **env}}
    if working_dir:
        renv["working_dir"] = working_dir
    if pip:
        renv["pip"] = list(pip)
    return renv


def run_submit(address: str, args: list[str], *, commands: Collection[str], working_dir: str | None = None,
               pip: list[str] | None = None, env: dict[str, str] | None = None, wait: bool = True,
               timeout_s: float | None = None, ready_s: float = 60.0) -> dict:
    """Submit `swm-ray ARGS` (ARGS[0] one of `commands`); with `wait`, stream the job's logs to stdout and
    return its final status. A cluster that has just started gets `ready_s` seconds to accept the job."""
    cmd = entrypoint(args, commands)
    if working_dir and "://" not in working_dir and not Path(working_dir).expanduser().exists():
        raise UserError(f"--working-dir {working_dir}: not found here (give a local folder or zip file, or the URL "
                        f"of a zip the cluster can fetch)")
    client = _client(address)
    job_id = _submit_when_ready(client, cmd, runtime_env(working_dir, pip, env or {}), ready_s)
    print(f"submitted {job_id}: {cmd}", file=sys.stderr, flush=True)
    if not wait:
        return {"job_id": job_id, "status": str(client.get_job_status(job_id).value)}
    try:
        asyncio.run(_tail(client, job_id))
    except KeyboardInterrupt:
        raise UserError(f"stopped following job {job_id}; it keeps running on the cluster: swm-ray submit "
                        f"--address {without_userinfo(address)} --stop {job_id} stops it", exit_code=130) from None
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    status = str(client.get_job_status(job_id).value)
    while status not in TERMINAL and (deadline is None or time.monotonic() < deadline):
        time.sleep(0.5)
        status = str(client.get_job_status(job_id).value)
    return {"job_id": job_id, "status": status}


def _submit_when_ready(client, cmd: str, renv: dict, patience_s: float = 60.0) -> str:
    """Submit; a cluster that has just started answers "no available agent" for a while: retry then."""
    deadline = time.monotonic() + patience_s
    while True:
        try:
            return client.submit_job(entrypoint=cmd, runtime_env=renv)
        except RuntimeError as e:
            if "No available agent" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(1.0)


async def _tail(client, job_id: str) -> None:
    async for lines in client.tail_job_logs(job_id):
        sys.stdout.write(lines)
        sys.stdout.flush()


def job_status(address: str, job_id: str) -> str:
    client = _client(address)
    return str(_asked(f"--status {job_id}", lambda: client.get_job_status(job_id)).value)


def stop_job(address: str, job_id: str) -> bool:
    client = _client(address)
    return bool(_asked(f"--stop {job_id}", lambda: client.stop_job(job_id)))
