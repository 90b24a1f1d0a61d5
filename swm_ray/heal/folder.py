"""The healed model folder: the compressed folder's layout and card plus `heal.json` and a healing section,
and its metrics updated in place."""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from swm_ray.io import fs as storage
from swm_ray.io.outputs import open_output
from swm_ray.io.remote import is_remote


# -- the healed folder ---------------------------------------------------------------------------------------------
@dataclass
class HealRecord:
    """What a heal run did, saved as `heal.json` beside the weights and summarised in the model card."""

    mode: str
    source_folder: str
    data: str
    settings: dict
    steps: int = 0
    examples: int | None = None
    loss_first: float | None = None
    loss_last: float | None = None
    tokens_per_s: float | None = None
    workers: int | None = None
    resumed_from_step: int | None = None
    seconds: float | None = None
    fits: list[dict] = field(default_factory=list)
    history: list[dict] = field(default_factory=list)

    def summary(self) -> dict:
        """The short form kept in plan.json (`extra.heal`)."""
        keep = ("mode", "data", "steps", "examples", "loss_first", "loss_last", "workers")
        out = {k: getattr(self, k) for k in keep if getattr(self, k) is not None}
        if self.fits:
            out["fits"] = [{"window": f["window"], "error_before": round(f["error_before"], 5),
                            "error_after": round(f["error_after"], 5)} for f in self.fits]
        return out

    def to_json(self) -> str:
        from dataclasses import asdict

        return json.dumps(asdict(self), indent=2, default=str) + "\n"


def render_heal_section(record: HealRecord) -> str:
    """The model card's `## Healing` section."""
    s = record.settings
    if record.mode == "local":
        which = ("Each merged layer, and every layer above the lowest one, was refit alone to the original model's "
                 "hidden state at its place" if s.get("local_layers") == "above" else
                 "Each merged layer was refit alone to the original model's output over its window")
        lines = [f"{which} (`swm-ray heal --mode local`): {record.steps} Adam steps per layer at lr {s.get('lr')}, "
                 f"MSE of hidden states (target: {s.get('local_target')}), calibration text `{record.data}`.\n",
                 "| window (original layers) | relative error before | after |", "|---|---|---|"]
        lines += [f"| [{f['window'][0]}, {f['window'][1]}] | {f['error_before']:.4f} | {f['error_after']:.4f} |"
                  for f in record.fits]
    else:
        lines = [f"LoRA (r {s.get('lora_r')}, alpha {s.get('lora_alpha')}, dropout {s.get('lora_dropout')} on "
                 f"{', '.join(s.get('target_modules', []))}) trained on `{record.data}` for {record.steps} steps "
                 f"(effective batch {s.get('batch_size')}, lr {s.get('lr')}, {record.workers} Ray Train "
                 f"worker(s)) and merged into the weights (`swm-ray heal --mode lora`).\n"]
        if record.loss_first is not None:
            lines.append(f"Training loss: {record.loss_first:.4f} (first step) → {record.loss_last:.4f} (last).")
    lines.append("\nThe full training record is in `heal.json`.\n")
    from swm_ray.plan.sources import scrub_local_paths

    return scrub_local_paths("## Healing\n\n" + "\n".join(lines) + "\n")  # a card is published: no local paths


def healed_card(plan, record: HealRecord, *, metrics: dict | None, resolved_yaml: str, name: str) -> str:
    """The model card of a healed folder: `compress`'s card with a Healing section before its Metrics."""
    from swm_ray.plan.card import render_model_card
    from swm_ray.plan.sources import scrub_local_paths

    card = render_model_card(plan, metrics=metrics, resolved_yaml=resolved_yaml, name=name)
    section = render_heal_section(record)
    anchor = next((a for a in ("## Metrics\n", "## How to load\n") if a in card), None)
    if anchor is None:
        return card + "\n" + section
    head, tail = card[:card.index(anchor)], card[card.index(anchor):]
    if plan.method == "none":  # a model swm-ray did not compress (`jobs/heal._read_plan`): no plan to describe
        head = head[:head.index("Produced by")] + scrub_local_paths(f"Healed by **swm-ray** from "
                                                                      f"`{record.source_folder}`.\n\n")
    return head + section + "\n" + tail


def write_healed_folder(model, tokenizer, out: str, *, plan, record: HealRecord, raw_yaml: str, resolved_yaml: str,
                        overwrite: bool = False, adapter_dir: str | Path | None = None,
                        metrics: dict | None = None) -> str:
    """Write the healed model (in memory) as a model folder at `out` (local or s3://), atomically: the
    folder `compress` writes, its card with a Healing section, `heal.json`, `adapter/` when given."""
    from swm_ray.plan.writer import save_model_folder

    plan.extra = {**plan.extra, "heal": record.summary()}
    with tempfile.TemporaryDirectory(prefix="swm-ray-heal-") as tmp:
        local = Path(tmp) / "model"
        save_model_folder(model, tokenizer, str(local), plan=plan, raw_yaml=raw_yaml, resolved_yaml=resolved_yaml,
                          metrics=metrics)
        name = Path(str(out).rstrip("/")).name
        (local / "README.md").write_text(healed_card(plan, record, metrics=metrics, resolved_yaml=resolved_yaml,
                                                     name=name))
        (local / "heal.json").write_text(record.to_json())
        if adapter_dir is not None:
            shutil.copytree(adapter_dir, local / "adapter")
        (local / storage.OWNER_MARK).unlink(missing_ok=True)
        with open_output(out, overwrite=overwrite) as sink:
            sink.put_dir(local)
    return out if is_remote(out) else str(Path(out).resolve())


def update_healed_metrics(out: str, plan, record: HealRecord, metrics: dict, resolved_yaml: str) -> None:
    """Put evaluation metrics into a healed folder: `metrics.json` and the card (Healing section kept)."""
    card = healed_card(plan, record, metrics=metrics, resolved_yaml=resolved_yaml, name=Path(str(out)).name)
    files = {"metrics.json": json.dumps(metrics, indent=2, default=str) + "\n", "README.md": card}
    for fname, text in files.items():
        storage.replace_file(f"{out.rstrip('/')}/{fname}", text.encode())
