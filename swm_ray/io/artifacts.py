"""Files that every run leaves behind: the similarity matrix (npy, parquet, heatmap), stats, configs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

SIMILARITY_FILES = ("similarity.npy", "similarity.parquet", "similarity.png", "stats.json")


def fmt_cell(value, digits: int = 2) -> str:
    """A value for a Markdown table: floats with `digits` decimals and thousands separators, integers with
    separators, None and NaN empty, anything else as text."""
    if value is None or (isinstance(value, float) and value != value):
        return ""
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def layer_labels(n: int) -> list[str]:
    """Index 0 is the embedding output, index i the output of decoder layer i-1 (0-based)."""
    return ["emb"] + [f"L{i}" for i in range(n - 1)]


def write_configs(folder: Path, raw_yaml: str, resolved_yaml: str) -> None:
    (folder / "config.yaml").write_text(raw_yaml or "# no --config file: defaults and flags only\n")
    (folder / "config.resolved.yaml").write_text(resolved_yaml)


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False, default=float) + "\n")


def write_similarity(folder: Path, matrix: np.ndarray, title: str) -> None:
    """similarity.npy (float64), similarity.parquet (long form: i, j, labels, cka) and similarity.png."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    np.save(folder / "similarity.npy", matrix.astype(np.float64))
    n = matrix.shape[0]
    labels = layer_labels(n)
    ii, jj = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    table = pa.table(
        {
            "i": ii.ravel().astype(np.int32),
            "j": jj.ravel().astype(np.int32),
            "label_i": [labels[i] for i in ii.ravel()],
            "label_j": [labels[j] for j in jj.ravel()],
            "cka": matrix.ravel().astype(np.float64),
        }
    )
    pq.write_table(table, folder / "similarity.parquet")
    plot_heatmap(matrix, folder / "similarity.png", title)


def plot_heatmap(matrix: np.ndarray, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = matrix.shape[0]
    fig, ax = plt.subplots(figsize=(7.5, 6.5), dpi=120)
    im = ax.imshow(matrix, cmap="magma", vmin=0.0, vmax=1.0, origin="upper", interpolation="nearest")
    step = 1 if n <= 20 else 2 if n <= 40 else 4
    ticks = list(range(0, n, step))
    labels = ["emb" if t == 0 else str(t) for t in ticks]
    ax.set_xticks(ticks, labels, fontsize=7, rotation=90)
    ax.set_yticks(ticks, labels, fontsize=7)
    ax.set_xlabel("layer output (emb = embedding output, i = decoder layer i, 1-based)")
    ax.set_ylabel("layer output")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label="CKA")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
