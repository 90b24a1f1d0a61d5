"""What `auto` can see of written plans, side by side: the held-out calibration rows and the task-style items.

    python benchmarks/gate_signals.py NAME=FOLDER [NAME=FOLDER ...] [--model SOURCE] [--rows 32] [--items 192]
        [--out runs/gate.json]

Each FOLDER is a written model (`compress`, `apply`): a plain `transformers` folder of the same source. For
each, with the default run's draw (`data.seed` etc. of `build_config()` on SOURCE):
- the per-row mean NLL on the first `--rows` held-out calibration rows (the rows `auto` holds out beyond
  `data.samples`, in its order: the first 8 are the race's rows, the rest the close call's);
- on the task-style items of `auto` (`tasksignal.build_items`, the held-out slices of PIQA, HellaSwag and
  WinoGrande, same seed): accuracy per item, and the loss of the correct continuation per byte (nats), per item.

The first NAME is the reference of the paired differences printed at the end (mean ± standard error, per row
or per item). Plain forwards, one row at a time: slow, but independent of the library's own scoring paths.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch


def _forward_logp(model, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        logits = model(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


def heldout_rows(model, rows: np.ndarray) -> np.ndarray:
    out = []
    for r in rows:
        logp = _forward_logp(model, [int(t) for t in r])
        tgt = torch.tensor(r[1:], dtype=torch.long)
        out.append(float(-logp[:-1].gather(-1, tgt[:, None]).double().mean()))
    return np.array(out)


def task_signals(model, rows) -> tuple[np.ndarray, np.ndarray]:
    """(accuracy per item, loss per byte of the correct continuation per item)."""
    from swm_ray.methods.tasksignal import item_scores, text_losses

    lls = []
    for ids, (a, b) in zip(rows.rows, rows.spans):
        logp = _forward_logp(model, list(ids))
        tgt = torch.tensor(ids[a:b], dtype=torch.long)
        lls.append(float(logp[a - 1 : b - 1].gather(-1, tgt[:, None]).double().sum()))
    return item_scores(rows, lls), text_losses(rows, lls)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("plans", nargs="+", help="NAME=FOLDER")
    ap.add_argument("--model", default="builtin:smollm2-135m")
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--items", type=int, default=192)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()

    from transformers import AutoModelForCausalLM

    from swm_ray.compute.validation import RowLosses, paired
    from swm_ray.config import build_config
    from swm_ray.io.data import calibration_sets, wants_bos
    from swm_ray.io.models import load_config, load_tokenizer
    from swm_ray.methods.tasksignal import build_items, task_rows

    cfg = build_config()
    cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"source": a.model})})
    sets = calibration_sets(cfg, a.rows, fit=True)
    val = sets.validation.input_ids
    tok = load_tokenizer(sets.path, False)
    bos = wants_bos(tok, getattr(load_config(sets.path, False), "model_type", None), cfg.data.bos)
    rows = task_rows(build_items(tok, a.items, seed=cfg.data.seed, bos=bos))
    res = {}
    for spec in a.plans:
        name, folder = spec.split("=", 1)
        t = time.time()
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        h = heldout_rows(model, val)
        acc, gold = task_signals(model, rows)
        res[name] = {"folder": folder, "heldout": h.tolist(), "acc": acc.tolist(), "gold": gold.tolist()}
        print(f"{name}: held-out NLL {h[:8].mean():.4f} (8) {h.mean():.4f} ({len(h)}); items: accuracy "
              f"{acc.mean():.3f}, correct-continuation loss {gold.mean():.4f} nats/byte ({time.time() - t:.0f} s)",
              flush=True)
        del model
    ref = a.plans[0].split("=", 1)[0]
    for name, r in res.items():
        if name == ref:
            continue
        out = []
        for key, label, n in (("heldout", "held-out (8)", 8), ("heldout", f"held-out ({a.rows})", None),
                              ("acc", "accuracy", None), ("gold", "continuation loss", None)):
            d = paired(RowLosses(np.array(r[key][:n])), RowLosses(np.array(res[ref][key][:n])))
            out.append(f"{label} {d.diff:+.4f} ± {d.se:.4f}")
        print(f"{name} − {ref}: " + "; ".join(out))
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"model": a.model, "items": rows.n_items, "plans": res}, f)


if __name__ == "__main__":
    main()
