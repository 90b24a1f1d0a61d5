"""Memory an actor needs for 7B, 13B and 70B Llama-shaped models, computed from the shapes (nothing loaded).

    python benchmarks/memory_table.py

Assumptions: bf16 weights and hidden states (a GPU run), untied embeddings, vocab 32000; the default
calibration (10 rows of 128 tokens) on ONE actor (K actors each hold 1/K of the rows); in memory, the
scorer caches the current model's hidden state at every layer; streaming keeps one stream per candidate of
a best-first step alive (L − 1 of them at the first step, at most). Shapes: Llama-2-7B (d 4096, 32 layers,
FFN 11008, 32 KV heads), Llama-2-13B (d 5120, 40 layers, FFN 13824, 40 KV heads), Llama-2-70B (d 8192,
80 layers, FFN 28672, 8 KV heads). Prints a Markdown table.
"""

from __future__ import annotations

SHAPES = {
    "7B": dict(hidden=4096, layers=32, ffn=11008, heads=32, kv=32),
    "13B": dict(hidden=5120, layers=40, ffn=13824, heads=40, kv=40),
    "70B": dict(hidden=8192, layers=80, ffn=28672, heads=64, kv=8),
}
VOCAB, ROWS, SEQ, BYTES = 32000, 10, 128, 2
GB = 1e9


def sizes(hidden: int, layers: int, ffn: int, heads: int, kv: int) -> dict:
    head_dim = hidden // heads
    attn = 2 * hidden * hidden + 2 * hidden * kv * head_dim
    mlp = 3 * hidden * ffn
    layer = (attn + mlp + 2 * hidden) * BYTES
    resident = (2 * VOCAB * hidden + hidden) * BYTES
    stream = ROWS * SEQ * hidden * BYTES
    weights = layers * layer + resident
    return {
        "weights": weights,
        "layer": layer,
        "resident": resident,
        "in_memory": weights + (layers + 2) * stream,  # + the cached hidden state at every position
        "streaming": resident + 3 * layer + (layers + 1) * stream,  # floor + one stream per candidate
        "writer": max(hidden * ffn, VOCAB * hidden) * 4,  # one tensor's float32 accumulator (mean/paper merge)
    }


def main() -> None:
    print("| model | weights (bf16) | one layer | embeddings + LM head | in memory, per actor | streaming, per "
          "actor | streaming writer |")
    print("|---|---|---|---|---|---|---|")
    for name, shape in SHAPES.items():
        s = sizes(**shape)
        print(f"| {name} | {s['weights'] / GB:.1f} GB | {s['layer'] / GB:.2f} GB | {s['resident'] / GB:.2f} GB | "
              f"{s['in_memory'] / GB:.1f} GB | {s['streaming'] / GB:.1f} GB | {s['writer'] / GB:.2f} GB |")


if __name__ == "__main__":
    main()
