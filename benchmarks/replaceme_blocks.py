"""ReplaceMe's block per calibration seed, with its angular distance read at the last token (as published) and
over every position but the first (`select.replaceme_tokens`): does the block move with the calibration draw?

    .venv/bin/python benchmarks/replaceme_blocks.py MODEL N SEEDS [--threads 2]

MODEL is a model source (`builtin:smollm2-135m`), N the layers removed, SEEDS comma-separated calibration
seeds. The rows are the planning rows `compress` draws for that seed (`io.data.calibration_sets`, the default
data settings); the distances come from the reference pass (`LocalScoring.angular_distances`) and the block from
the planner's own `replaceme_windows`. In process, the model in memory; no Ray.
"""

from __future__ import annotations

import argparse


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("n", type=int)
    ap.add_argument("seeds")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import torch

    from swm_ray.compute.stack import InMemoryStack
    from swm_ray.config import build_config
    from swm_ray.io.data import calibration_sets
    from swm_ray.io.models import load_model, resolve_model_path
    from swm_ray.methods.baselines import replaceme_windows
    from swm_ray.methods.planners import protected_set
    from swm_ray.methods.session import LocalScoring

    torch.set_num_threads(args.threads)
    model = stack = None
    for seed in [int(s) for s in args.seeds.split(",")]:
        cfg = build_config(flags={"model.source": args.model, "data.seed": seed})
        sets = calibration_sets(cfg, cfg.select.auto_validation_max, fit=True)
        if model is None:
            model, _ = load_model(resolve_model_path(args.model))
            stack = InMemoryStack(model)
        prot = protected_set(cfg.select, stack.num_layers)
        got, blocks = [], set()
        for tokens in ("last", "all"):
            dist = LocalScoring(stack, sets.plan).angular_distances(tokens)
            (w,), d = replaceme_windows(dist, args.n, protected=prot)
            blocks.add(tuple(w))
            got.append(f"{tokens}: layers {w[0] + 1}–{w[1]} (window {w[0]}–{w[1]}, {d:.4f})")
        print(f"seed {seed}: " + "; ".join(got) + ("  <- differ" if len(blocks) > 1 else ""), flush=True)


if __name__ == "__main__":
    main()
