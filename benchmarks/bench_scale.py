"""Scale-out benchmarks: memory that does not grow with depth, a budget 4× smaller than the model, the
streaming writer against a plain copy, and 2 actors against 1.

    python benchmarks/bench_scale.py rss          # peak RSS, 8 vs 32 layers; a model 4x the budget under it
    python benchmarks/bench_scale.py writer       # streaming writer vs copying the checkpoint's bytes
    python benchmarks/bench_scale.py actors       # 2 actors vs 1 (one thread each), with Ray
    python benchmarks/bench_scale.py all

Models are random-init Llama-shaped checkpoints (hidden 1024, FFN 2816, 16 heads, vocab 32000, fp32) written
once into $SWM_BENCH_DIR (default /tmp/swm-bench). Calibration: 10 random rows of 128 tokens (minibatches of
5), the defaults' shape. Each measurement of memory runs in a fresh process (`_child`), which reports its own
peak RSS (VmHWM) and the RSS it had once the libraries were loaded and warm, before the model was opened
("base": see `_warm_up`). The library
floor runs there without Ray: one process does what the driver and one actor do in a real run. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(os.environ.get("SWM_BENCH_DIR", "/tmp/swm-bench"))
SHAPE = dict(hidden_size=1024, intermediate_size=2816, num_attention_heads=16, num_key_value_heads=16,
             vocab_size=32000, max_position_embeddings=2048)
ROWS, SEQ, BATCH = 10, 128, 5


def model_dir(layers: int) -> Path:
    """A saved random-init model with `layers` decoder layers (created once)."""
    d = ROOT / f"llama-d1024-L{layers}"
    if not (d / "config.json").exists():
        import torch
        from transformers import AutoModelForCausalLM, LlamaConfig

        torch.manual_seed(layers)
        cfg = LlamaConfig(**SHAPE, num_hidden_layers=layers, tie_word_embeddings=False)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        tmp = d.with_name(d.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp, max_shard_size="1GB")
        tmp.rename(d)
    return d


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def rss_mb() -> float:
    return _status_mb("VmRSS")


def peak_mb() -> float:
    """This process's own peak RSS (VmHWM). Not ru_maxrss: Linux carries that over from the parent across
    fork + exec, so a child would report its parent's peak."""
    return _status_mb("VmHWM")


def _ids():
    import numpy as np

    return np.random.default_rng(0).integers(3, SHAPE["vocab_size"], size=(ROWS, SEQ))


# -- what one process runs ----------------------------------------------------------------------------------
def _warm_up() -> None:
    """Load the libraries' code and kernels (a 2-layer Llama of width 64, one forward) so that "base" is the
    process with everything but the model's tensors: a budget covers tensors, the libraries come on top."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, vocab_size=256)
    with torch.inference_mode():
        AutoModelForCausalLM.from_config(cfg)(torch.ones(2, 16, dtype=torch.long))



def _child(args) -> dict:
    import torch

    from swm_ray.compute.capture import compute_hsic_sums
    from swm_ray.compute.scoring import LocalEvaluator, ShardScorer
    from swm_ray.compute.stack import StackSpec, open_stack
    from swm_ray.io.data import minibatches
    from swm_ray.methods.selection import MemoEvaluator, best_first
    from swm_ray.plan.plan import Plan
    from swm_ray.plan.writer import write_model_folder

    torch.set_num_threads(args.threads)
    path = str(model_dir(args.layers))
    ids = _ids()
    _warm_up()
    base = rss_mb()
    t0 = time.perf_counter()
    spec = StackSpec(path, device="cpu", dtype="float32", stream=args.stream, max_memory=args.max_memory)
    stack = open_stack(spec, rows=ROWS, seq_len=SEQ)
    out: dict = {"task": args.task, "layers": args.layers, "mode": "stream" if stack.streaming else "memory",
                 "base_mb": round(base, 1)}
    if args.task == "analyze":
        compute_hsic_sums(stack, ids, minibatches(ROWS, BATCH), skip_first_tokens=1)
    else:
        ev = MemoEvaluator(LocalEvaluator([ShardScorer.over(stack, ids, "reference")], "output"))
        sel = best_first(args.layers, ev, layers_to_remove=2, protected=[args.layers - 1])
        out["windows"] = [list(w) for w in sel.windows]
        del ev, stack
        plan = Plan(windows=out["windows"], num_layers_before=args.layers, merge="reference")
        dest = ROOT / f"out-{os.getpid()}"
        write_model_folder(path, plan, str(dest), raw_yaml="", resolved_yaml="", overwrite=True, verify=False)
        shutil.rmtree(dest, ignore_errors=True)
    out.update(seconds=round(time.perf_counter() - t0, 2), peak_mb=round(peak_mb(), 1))
    out["above_base_mb"] = round(out["peak_mb"] - base, 1)
    return out


def run_child(*flags: str) -> dict:
    cmd = [sys.executable, __file__, "child", *flags]
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


# -- the benchmarks ------------------------------------------------------------------------------------------
BUDGET = "470MB"  # the 32-layer model's fp32 weights (1.91 GB) are 4.06x this


def bench_rss() -> dict:
    """Peak RSS at 8 and 32 layers for analyze and compress --layers 2: streaming with the default budget
    (host RAM: every candidate's stream alive at once), streaming under --max-memory 470MB (the scorer runs
    as many candidates per pass as the budget allows), and in memory. The 32-layer model under 470MB is the
    budget target: fp32 weights 4x the budget, compressed under it, windows compared with the in-memory run."""
    from swm_ray.io.checkpoint import Checkpoint
    from swm_ray.io.sizes import parse_size

    model_dir(8), model_dir(32)
    variants = {"stream": ("--stream", "always"), "budget": ("--stream", "auto", "--max-memory", BUDGET),
                "memory": ("--stream", "never")}
    rows = []
    for task in ("analyze", "compress"):
        for name, flags in variants.items():
            for layers in (8, 32):
                rows.append({"variant": name, **run_child("--task", task, *flags, "--layers", str(layers))})
    ratios = {}
    for task in ("analyze", "compress"):
        for name in variants:
            a, b = (next(r for r in rows if r["task"] == task and r["variant"] == name and r["layers"] == n)
                    for n in (8, 32))
            ratios[f"{task}_{name}_32_over_8"] = round(b["peak_mb"] / a["peak_mb"], 3)
    weights = Checkpoint(model_dir(32)).nbytes()
    limited, whole = (next(r for r in rows if r["task"] == "compress" and r["variant"] == v and r["layers"] == 32)
                      for v in ("budget", "memory"))
    budget = {"weights_mb": round(weights / 1e6, 1), "budget_mb": parse_size(BUDGET) / 1e6,
              "weights_over_budget": round(weights / parse_size(BUDGET), 2), "mode": limited["mode"],
              "above_base_mb": limited["above_base_mb"], "same_windows_as_in_memory": limited["windows"] ==
              whole["windows"], "within_budget": limited["above_base_mb"] * 1e6 <= parse_size(BUDGET)}
    return {"runs": rows, "ratios": ratios, "budget": budget}


def _writer_child(args) -> dict:
    from swm_ray.plan.plan import Plan
    from swm_ray.plan.writer import write_model_folder

    src = model_dir(args.layers)
    dest = ROOT / f"writer-{os.getpid()}"
    shutil.rmtree(dest, ignore_errors=True)
    base = rss_mb()
    t0 = time.perf_counter()
    if args.task == "copy":  # what `cp` does: every byte of the checkpoint read and written once
        dest.mkdir()
        for f in src.glob("*.safetensors"):
            shutil.copyfile(f, dest / f.name)
        os.sync()
    else:
        plan = Plan(windows=[[20, 22], [10, 11]], num_layers_before=args.layers, merge=args.merge)
        write_model_folder(str(src), plan, str(dest), raw_yaml="", resolved_yaml="", verify=False)
        os.sync()
    secs = time.perf_counter() - t0
    size = sum(f.stat().st_size for f in dest.rglob("*.safetensors"))
    shutil.rmtree(dest, ignore_errors=True)
    return {"task": args.task, "merge": args.merge, "seconds": round(secs, 2), "bytes_written": size,
            "peak_mb": round(peak_mb(), 1), "base_mb": round(base, 1), "above_base_mb": round(peak_mb() - base, 1)}


def bench_writer(repeat: int = 3) -> dict:
    """Streaming writer (reference and mean merges, with the source checksum) vs copying the checkpoint's
    safetensors files, alternating, on the same disk, page cache warm for both."""
    from swm_ray.io.checkpoint import Checkpoint

    src = model_dir(32)
    for f in src.glob("*.safetensors"):  # warm the page cache: both sides read the same bytes
        f.read_bytes()
    runs: list[dict] = []
    for _ in range(repeat):
        runs.append(run_child("--task", "copy", "--layers", "32", "--writer"))
        runs.append(run_child("--task", "write", "--merge", "reference", "--layers", "32", "--writer"))
        runs.append(run_child("--task", "write", "--merge", "mean", "--layers", "32", "--writer"))
    ck = Checkpoint(src)
    window = sum(ck.layer_nbytes(i) for i in (20, 21, 22))
    out = {"runs": runs, "largest_window_mb": round(window / 1e6, 1), "shard_mb": 2000.0}
    copy = statistics.median(r["seconds"] for r in runs if r["task"] == "copy")
    for merge in ("reference", "mean"):
        w = statistics.median(r["seconds"] for r in runs if r.get("merge") == merge and r["task"] == "write")
        out[f"{merge}_over_copy"] = round(w / copy, 2)
        out[f"{merge}_peak_above_base_mb"] = max(r["above_base_mb"] for r in runs if r.get("merge") == merge)
    return out


def bench_actors(repeat: int = 3) -> dict:
    """Statistics pass and one best-first step (all candidates of the first step) with 1 and 2 actors of one
    thread each, alternating; actors started beforehand (start-up not timed)."""
    import ray

    from swm_ray.compute.refpass import Needs
    from swm_ray.config import build_config
    from swm_ray.io.data import Calibration, minibatches
    from swm_ray.jobs.pool import RayBackend
    from swm_ray.methods.checks import CheckRequest
    from swm_ray.methods.selection import initial_groups, mergeable_pairs

    path = str(model_dir(8))
    ids = _ids()
    calib = Calibration(ids, minibatches(ROWS, BATCH), False, True, "random")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    times: dict[int, dict[str, list[float]]] = {1: {"stats": [], "step": []}, 2: {"stats": [], "step": []}}
    backends = {}
    for k in (1, 2):
        cfg = build_config(flags={"model.source": path, "ray.actors": k, "ray.threads_per_actor": 1,
                                  "ray.cpus_per_actor": 0.5, "model.stream": "never"})  # both pools fit 2 CPUs
        backends[k] = RayBackend(cfg, calib)
        backends[k].reference(Needs(checks=True, final=True))
    pools = {k: b.pool for k, b in backends.items()}
    cands = mergeable_pairs(initial_groups(8), {7})
    step = CheckRequest("reference", tuple(initial_groups(8)), tuple(cands), ("output",))
    for _ in range(repeat):
        for k in (1, 2):
            t0 = time.perf_counter()
            pools[k].hsic_sums(calib, "linear", 1)
            times[k]["stats"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            backends[k].check([step])
            times[k]["step"].append(time.perf_counter() - t0)
    for p in pools.values():
        p.shutdown()
    ray.shutdown()
    med = {k: {n: statistics.median(v) for n, v in t.items()} for k, t in times.items()}
    return {"seconds": times, "median": med, "stats_speedup": round(med[1]["stats"] / med[2]["stats"], 2),
            "step_speedup": round(med[1]["step"] / med[2]["step"], 2), "candidates": len(cands)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["rss", "writer", "actors", "all", "child"])
    ap.add_argument("--task", default="analyze")
    ap.add_argument("--stream", default="auto")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--max-memory", default=None)
    ap.add_argument("--merge", default="reference")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--writer", action="store_true")
    args = ap.parse_args()
    if args.what == "child":
        print(json.dumps(_writer_child(args) if args.writer else _child(args)))
        return
    ROOT.mkdir(parents=True, exist_ok=True)
    todo = ["rss", "writer", "actors"] if args.what == "all" else [args.what]
    fns = {"rss": bench_rss, "writer": bench_writer, "actors": bench_actors}
    print(json.dumps({name: fns[name]() for name in todo}, indent=1))


if __name__ == "__main__":
    main()
