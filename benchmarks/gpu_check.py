"""GPU check of the library floor (no Ray, no registry): a random-init model of a real shape.

    python benchmarks/gpu_check.py                 # Llama-2-7B shape, bf16, on CUDA
    python benchmarks/gpu_check.py --tiny          # a small shape on the CPU (what the test suite runs)

Measures, side by side in one process: a plain forward vs the statistics pass (ratio, tokens/s), and the
output-criterion candidate check of swm-ray (no copies, batched) vs the naive one (deep copy of the model,
full forward at batch 1), with peak memory of each. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import numpy as np
import torch

SHAPES = {
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256),
}


def _sync(dev: str) -> None:
    if dev.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(fn, dev: str, repeats: int) -> float:
    out = []
    for _ in range(repeats):
        _sync(dev)
        t0 = time.perf_counter()
        fn()
        _sync(dev)
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def _peak(dev: str, fn) -> tuple[float, float | None]:
    """(seconds, peak CUDA GiB during fn) — peak is None on the CPU."""
    if dev.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    fn()
    _sync(dev)
    secs = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**30 if dev.startswith("cuda") else None
    return secs, peak


def main() -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM, LlamaConfig

    from swm_ray.capture import compute_hsic_sums
    from swm_ray.data import minibatches
    from swm_ray.models import inner_model
    from swm_ray.scoring import ShardScorer

    shape = "tiny" if args.tiny else "llama2-7b"
    dev = "cpu" if args.tiny or not torch.cuda.is_available() else "cuda"
    dtype = torch.float32 if dev == "cpu" else torch.bfloat16
    cfg = LlamaConfig(**SHAPES[shape], max_position_embeddings=4096)
    with torch.device(dev):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()
    n_layers = cfg.num_hidden_layers
    ids = np.random.default_rng(0).integers(3, cfg.vocab_size, size=(args.samples, args.seq_len))
    batches = minibatches(args.samples, args.batch_size)
    res: dict = {"shape": shape, "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu",
                 "dtype": str(dtype), "tokens": int(ids.size)}
    if dev == "cuda":
        res["model_gib"] = torch.cuda.memory_allocated() / 2**30

    @torch.inference_mode()
    def plain():
        for a, b in batches:
            inner_model(model)(input_ids=torch.tensor(ids[a:b], device=dev), use_cache=False)

    def stats():
        compute_hsic_sums(model, ids, batches, skip_first_tokens=1)

    plain()
    stats()
    tp, ts = _timed(plain, dev, args.repeats), _timed(stats, dev, args.repeats)
    res.update(plain_s=tp, stats_s=ts, stats_over_plain=ts / tp, stats_tokens_per_s=ids.size / ts)

    scorer: list = []
    cap_s, cap_peak = _peak(dev, lambda: scorer.append(ShardScorer(model, ids, batches, "output", "reference")))
    windows = [(n_layers - 3, n_layers - 2), (n_layers // 2, n_layers // 2 + 1), (0, 1)]
    cand_s, cand_peak = _peak(dev, lambda: scorer[0].score(windows))
    res.update(scorer_capture_s=cap_s, scorer_peak_gib=cap_peak, swm_seconds_per_candidate=cand_s / len(windows),
               swm_candidate_peak_gib=cand_peak)
    scorer.clear()  # free the cached hidden states before the naive side is measured

    @torch.inference_mode()
    def naive_one():
        from swm_ray.merge import apply_windows

        cand = apply_windows(copy.deepcopy(model), [windows[1]], "reference")
        for i in range(args.samples):
            cand(torch.tensor(ids[i : i + 1], device=dev), output_hidden_states=True)
        del cand

    naive_s, naive_peak = _peak(dev, naive_one)
    res.update(naive_seconds_per_candidate=naive_s, naive_peak_gib=naive_peak,
               speedup_middle_window=naive_s / (cand_s / len(windows)))
    print(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
