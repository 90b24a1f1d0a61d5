"""A grid's results: one row per trial, finalized and written as JSON, CSV, a Markdown table and plots."""

from __future__ import annotations

import base64
import json
from pathlib import Path

from swm_ray.config import BASELINES, WIDTH_METHODS
from swm_ray.io.artifacts import fmt_cell
from swm_ray.recipes.specs import method_label, model_labels

ROW_KEYS = (
    "model", "method", "criterion", "search", "merge", "compensate", "target_kind", "target", "status", "threshold",
    "windows", "layers_before", "layers_after", "removed_layers", "params_before", "params_after",
    "params_removed", "ppl", "ppl_ratio", "zeroshot_mean", "task_source", "evaluations", "selection_seconds",
    "eval_seconds", "compensate_seconds", "heal", "heal_seconds", "width", "then_width", "tokens_per_s", "latency_s",
    "ttft_s", "note", "plan", "plan_tensors",
)
LATENCY_KEYS = ("tokens_per_s", "latency_s", "ttft_s")  # from `measure_latency`, when eval.latency is true


# -- results ------------------------------------------------------------------------------------------------
def finalize_rows(rows: list[dict]) -> list[dict]:
    """Fill every key, add ppl_ratio against each model's original, sort by model, method, removed layers."""
    task_keys = sorted({k for r in rows for k in r if k.startswith(("task_", "split_")) and k not in ROW_KEYS})
    keys = list(ROW_KEYS) + task_keys
    out = [{k: r.get(k) for k in keys} for r in rows]
    orig = {r["model"]: r["ppl"] for r in out if r["method"] == "original" and r.get("ppl")}
    for r in out:
        base = orig.get(r["model"])
        r["ppl_ratio"] = r["ppl"] / base if base and r.get("ppl") is not None else None
    rank = {"original": 0, **{b: 1 for b in (*BASELINES, *WIDTH_METHODS)}, "auto": 3}
    out.sort(key=lambda r: (str(r["model"]), rank.get(r["method"], 2), method_label(r),
                            r["removed_layers"] if r["removed_layers"] is not None else -1,
                            float(r["target"]) if r["target"] is not None else 0.0))
    return out


def markdown_table(rows: list[dict]) -> str:
    """The results table; latency columns (tokens/s, latency, time to first token) only when a row has them."""
    latency = any(r.get(k) is not None for r in rows for k in LATENCY_KEYS)
    head = "| model | method | target | layers | windows | params removed | PPL | × original | zero-shot |" + \
        (" tokens/s | latency (s) | TTFT (s) |" if latency else "") + " status |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    label = model_labels(r["model"] for r in rows)
    for r in rows:
        layers = f"{r['layers_before']} → {r['layers_after']}" if r.get("layers_after") is not None else ""
        timing = f"{fmt_cell(r.get('tokens_per_s'), 1)} | {fmt_cell(r.get('latency_s'), 3)} | " \
            f"{fmt_cell(r.get('ttft_s'), 4)} | " if latency else ""
        lines.append(
            f"| {label[str(r['model'])]} | {method_label(r)} | {fmt_cell(r['target'], 4)} | {layers} | "
            f"{r['windows'] or ''} | "
            f"{fmt_cell(100 * r['params_removed'], 1) + '%' if r.get('params_removed') is not None else ''} | "
            f"{fmt_cell(r['ppl'])} | {fmt_cell(r['ppl_ratio'])} | {fmt_cell(r['zeroshot_mean'], 3)} | {timing}"
            f"{r['status']} |"
        )
    return "\n".join(lines) + "\n"


def write_results(folder: Path, rows: list[dict]) -> list[str]:
    """results.parquet, results.csv, results.md, one plan file per row that has a plan (`plans/NNN-*.json`,
    so "re-run the chosen row" is `swm-ray apply OUT/plans/NNN-....json`; the tables name the file), and one
    perplexity plot per model; returns the file names."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    names: list[str] = []
    rows = [dict(r) for r in rows]
    label = model_labels(r["model"] for r in rows)
    for i, r in enumerate(rows):
        tensors = r.pop("plan_tensors", None)
        if r.get("plan"):
            name = f"plans/{i:03d}-{_slug(label[str(r['model'])])}-{_slug(method_label(r))}-{r['target']}.json"
            side = name.removesuffix(".json") + ".tensors"
            text = r["plan"]
            if tensors:  # the records name their side file (`Plan.load` reads a width plan's tensors by it)
                data = json.loads(text)
                for record in (data.get("compensation"), data.get("width")):
                    if record:
                        record["tensors_file"] = Path(side).name
                text = json.dumps(data, indent=2)
            (folder / "plans").mkdir(exist_ok=True)
            (folder / name).write_text(text if text.endswith("\n") else text + "\n")
            r["plan"] = name
            names.append(name)
            if tensors:  # a compensated plan's fitted matrices or FLAP's biases, beside it (`plan.tensors_path`)
                (folder / side).write_bytes(base64.b64decode(tensors))
                names.append(side)
    table = pa.Table.from_pylist(rows)
    pq.write_table(table, folder / "results.parquet")
    pacsv.write_csv(table, folder / "results.csv")
    (folder / "results.md").write_text(markdown_table(rows))
    names = ["results.parquet", "results.csv", "results.md", *names]
    names += plot_results(folder / "plots", rows)
    return names


def _slug(s: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in s).strip("_") or "model"


def plot_results(folder: Path, rows: list[dict]) -> list[str]:
    """Per model: perplexity (log scale) against layers removed (against parameters removed when the model has
    width rows, which remove no layers), one line per method, the original dashed; and the zero-shot mean the
    same way when it was measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    folder.mkdir(parents=True, exist_ok=True)
    names = []
    label = model_labels(r["model"] for r in rows)
    for model in sorted({r["model"] for r in rows}):
        mine = [r for r in rows if r["model"] == model and r["status"] == "ok"]
        by_params = any(r.get("width") for r in mine)
        x = {id(r): 100 * r["params_removed"] if by_params else r["removed_layers"] for r in mine}
        for metric, what, log in (("ppl", "perplexity", True), ("zeroshot_mean", "zero-shot mean", False)):
            if not any(r.get(metric) is not None for r in mine if r["method"] != "original"):
                continue
            fig, ax = plt.subplots(figsize=(7, 4.5))
            for meth in sorted({method_label(r) for r in mine if r["method"] != "original"}):
                pts = sorted((x[id(r)], r[metric]) for r in mine
                             if method_label(r) == meth and r.get(metric) is not None)
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=meth)
            base = [r[metric] for r in mine if r["method"] == "original" and r.get(metric) is not None]
            if base:
                ax.axhline(base[0], color="gray", linestyle="--", label="original")
            if log:
                ax.set_yscale("log")
            if not by_params:
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlabel("parameters removed (%)" if by_params else "decoder layers removed")
            ax.set_ylabel(what)
            ax.set_title(f"{label[str(model)]}: {what}")
            ax.legend(fontsize=8)
            fig.tight_layout()
            name = f"{metric}_{_slug(label[str(model)])}.png"
            fig.savefig(folder / name, dpi=110)
            plt.close(fig)
            names.append(f"plots/{name}")
    return names
