"""GPU check of the library floor (no Ray, no registry): a random-init model of a real shape.

    python benchmarks/gpu_check.py                 # Llama-2-7B shape, bf16, on CUDA
    python benchmarks/gpu_check.py --tiny          # a small shape on the CPU (what the test suite runs)

Measures, side by side in one process: a plain forward vs the statistics pass (ratio, tokens/s over the
tokens of the minibatches both passes run), and the output-criterion candidate check of swm-ray (no copies,
batched) vs the naive one (deep copy of the model, full forward at batch 1), with peak memory of each and the
score each finds for the middle window (they must agree). Prints one JSON object.
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


def _streaming(model, ids, batches, dev: str, dtype, repeats: int, plain_s: float) -> dict:
    """The statistics pass with layer streaming from a safetensors copy of `model` (written to a temporary
    folder; the page cache holds it after the first pass), against the in-memory plain forward."""
    import tempfile

    from swm_ray.compute.capture import compute_hsic_sums
    from swm_ray.compute.stack import StreamingStack

    with tempfile.TemporaryDirectory(prefix="swm-gpu-check-") as tmp:
        t0 = time.perf_counter()
        model.save_pretrained(tmp)
        save_s = time.perf_counter() - t0
        stream = StreamingStack.from_path(tmp, torch.device(dev), dtype)
        resident = torch.cuda.memory_allocated() / 2**30 if dev.startswith("cuda") else None

        def run():
            compute_hsic_sums(stream, ids, batches, skip_first_tokens=1)

        run()  # warm the page cache
        ts = _timed(run, dev, repeats)
        _, peak = _peak(dev, run)
    tokens = sum(b - a for a, b in batches) * ids.shape[1]
    return {"stream_save_s": save_s, "stream_stats_s": ts, "stream_stats_tokens_per_s": tokens / ts,
            "stream_over_plain": ts / plain_s, "stream_resident_gib": resident, "stream_peak_gib": peak}


def main() -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-stream", action="store_true", help="skip the layer-streaming measurement")
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM, LlamaConfig

    from swm_ray.compute.capture import compute_hsic_sums
    from swm_ray.compute.refpass import Needs, Reference
    from swm_ray.compute.scoring import ShardScorer, groups_from, reduce_signals
    from swm_ray.compute.stack import InMemoryStack
    from swm_ray.io.anatomy import inner_model
    from swm_ray.io.data import minibatches

    shape = "tiny" if args.tiny else "llama2-7b"
    dev = "cpu" if args.tiny or not torch.cuda.is_available() else "cuda"
    dtype = torch.float32 if dev == "cpu" else torch.bfloat16
    cfg = LlamaConfig(**SHAPES[shape], max_position_embeddings=4096)
    with torch.device(dev):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()
    n_layers = cfg.num_hidden_layers
    ids = np.random.default_rng(0).integers(3, cfg.vocab_size, size=(args.samples, args.seq_len))
    batches = minibatches(args.samples, args.batch_size)
    pass_tokens = sum(b - a for a, b in batches) * args.seq_len  # a short tail of rows is dropped
    res: dict = {"shape": shape, "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu",
                 "dtype": str(dtype), "tokens": int(ids.size), "stats_tokens": pass_tokens}
    if dev == "cuda":
        res["model_gib"] = torch.cuda.memory_allocated() / 2**30

    plain_tokens: list[int] = []

    @torch.inference_mode()
    def plain():
        plain_tokens.clear()
        for a, b in batches:
            x = torch.tensor(ids[a:b], device=dev)
            inner_model(model)(input_ids=x, use_cache=False)
            plain_tokens.append(x.numel())

    stack = InMemoryStack(model)

    def stats():
        compute_hsic_sums(stack, ids, batches, skip_first_tokens=1)

    plain()
    stats()
    tp, ts = _timed(plain, dev, args.repeats), _timed(stats, dev, args.repeats)
    res.update(plain_s=tp, stats_s=ts, stats_over_plain=ts / tp, stats_tokens_per_s=pass_tokens / ts,
               plain_tokens=sum(plain_tokens))

    if not args.no_stream:
        res.update(_streaming(model, ids, batches, dev, dtype, args.repeats, tp))

    rows = [i for a, b in batches for i in range(a, b)]  # the rows the scorer sees
    # the one reference pass of a default run: every signal the planners use, the inputs the checks start from
    everything = Needs(checks=True, final=True, influence=True, angular=True, hsic=True, skip_first_tokens=1)
    scorer: list = []

    def reference():
        ref = Reference(stack, ids[rows], everything, hsic_batches=dict(enumerate(batches)))
        scorer.append(ShardScorer(ref, "reference"))

    cap_s, cap_peak = _peak(dev, reference)
    windows = [(n_layers - 3, n_layers - 2), (n_layers // 2, n_layers // 2 + 1), (0, 1)]
    parts: list = []
    groups = groups_from(n_layers, [])
    cand_s, cand_peak = _peak(dev, lambda: parts.append(scorer[0].score(groups, windows, ("output", "nll"))))
    res.update(scorer_capture_s=cap_s, scorer_peak_gib=cap_peak, reference_over_plain=cap_s / tp,
               swm_seconds_per_candidate=cand_s / len(windows), swm_candidate_peak_gib=cand_peak,
               windows=[list(w) for w in windows],
               swm_scores=[d["output"] for d in reduce_signals(parts)])
    scorer.clear()  # free the cached hidden states before the naive side is measured

    @torch.inference_mode()
    def finals(m) -> list[torch.Tensor]:
        return [m(torch.tensor(ids[i : i + 1], device=dev), output_hidden_states=True).hidden_states[-1]
                .flatten().float() for i in rows]

    reference = finals(model)  # the original's outputs (not timed: the naive check needs them once too)
    naive_cos: list[float] = []

    @torch.inference_mode()
    def naive_one():
        from swm_ray.edits.merge import apply_windows

        cand = apply_windows(copy.deepcopy(model), [windows[1]], "reference")
        naive_cos.extend(float(torch.nn.functional.cosine_similarity(r, c, dim=0))
                         for r, c in zip(reference, finals(cand)))
        del cand

    naive_s, naive_peak = _peak(dev, naive_one)
    res.update(naive_seconds_per_candidate=naive_s, naive_peak_gib=naive_peak,
               speedup_middle_window=naive_s / (cand_s / len(windows)),
               naive_score_middle_window=sum(naive_cos) / len(naive_cos))
    print(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
