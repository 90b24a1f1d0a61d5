"""Cost of the statistics pass against a plain forward pass over the same tokens (same model, same process).

    .venv/bin/python benchmarks/bench_stats.py [--samples 10] [--seq-len 128] [--batch-size 5] [--repeats 5]

Both sides run the decoder stack without the LM head (the statistics never need logits), alternating, and
the ratio of medians is reported. The extra cost is then split into its parts (features to float64,
Gram matrices, HSIC for all pairs) by timing them on captured hidden states.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from swm_ray.compute.capture import compute_hsic_sums
    from swm_ray.compute.similarity import features, gram, hsic_matrix
    from swm_ray.io.anatomy import decoder_layers, inner_model
    from swm_ray.io.data import build_calibration
    from swm_ray.io.models import load_model

    model, tok = load_model("builtin:smollm2-135m")
    cal = build_calibration("builtin:lambada", tok, samples=args.samples, seq_len=args.seq_len,
                            batch_size=args.batch_size)
    inner = inner_model(model)

    @torch.inference_mode()
    def plain():
        for a, b in cal.batches:
            inner(input_ids=torch.tensor(cal.input_ids[a:b]), use_cache=False)

    def stats():
        compute_hsic_sums(model, cal.input_ids, cal.batches, skip_first_tokens=1)

    plain()
    stats()  # warm-up
    tp, ts = [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        plain()
        tp.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        stats()
        ts.append(time.perf_counter() - t0)
    mp, ms = statistics.median(tp), statistics.median(ts)
    # the parts of the overhead, on hidden states of one minibatch
    a, b = cal.batches[0]
    with torch.inference_mode():
        hs = model(input_ids=torch.tensor(cal.input_ids[a:b]), output_hidden_states=True).hidden_states
    n = len(decoder_layers(model)) + 1
    t0 = time.perf_counter()
    feats = [features(h, 1) for h in hs[:n]]
    t1 = time.perf_counter()
    grams = torch.stack([gram(f) for f in feats])
    t2 = time.perf_counter()
    hsic_matrix(grams)
    t3 = time.perf_counter()
    nb = len(cal.batches)
    print(f"threads={torch.get_num_threads()} tokens={cal.tokens} minibatches={nb} repeats={args.repeats}")
    print(f"plain forward  median {mp:.3f} s  ({cal.tokens / mp:.0f} tokens/s)")
    print(f"statistics     median {ms:.3f} s  ({cal.tokens / ms:.0f} tokens/s)")
    print(f"ratio statistics/plain = {ms / mp:.3f}")
    print(f"overhead parts per pass: float64 features {nb * (t1 - t0):.3f} s, Gram {nb * (t2 - t1):.3f} s, "
          f"HSIC all pairs {nb * (t3 - t2):.4f} s")


if __name__ == "__main__":
    main()
