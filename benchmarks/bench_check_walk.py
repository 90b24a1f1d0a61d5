"""Layer runs of one best-first step of candidate checks in memory (every adjacent pair of groups merged), from
the original and from a plan with one window: what `ShardScorer.score` runs through decoder layers per token.

    PYTHONPATH=CHECKOUT .venv/bin/python benchmarks/bench_check_walk.py MODEL_FOLDER    # run from outside the repo
"""

import sys
import time

import numpy as np
import torch
from transformers import AutoModelForCausalLM

import swm_ray
from swm_ray.compute.scoring import ShardScorer, groups_from
from swm_ray.compute.stack import InMemoryStack

print(swm_ray.__file__)
path = sys.argv[1]
model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
stack = InMemoryStack(model)
ids = np.random.default_rng(0).integers(100, 20000, size=(10, 128))
sc = ShardScorer.over(stack, ids, "reference")
n_layers = model.config.num_hidden_layers
for windows in ([], [(13, 19)]):
    g = groups_from(n_layers, windows)
    sc.state(g)
    n = len(g)
    cands = [(g[p][0], g[p + 1][1]) for p in range(n - 1)]
    before = stack.token_runs
    t = time.perf_counter()
    sc.score(g, cands)
    print(windows, "candidates", len(cands), "layer runs per row token:", (stack.token_runs - before) / ids.size,
          f"{time.perf_counter() - t:.1f} s")
