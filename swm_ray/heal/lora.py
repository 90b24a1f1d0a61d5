"""Healing: recovery training of a depth-compressed model (floor 1: no ray, no typer).

Two modes, both ending in a plain model folder (the same layout and card as `compress`, plus `heal.json`):

- **local**: each merged layer named by `plan.json` is trained alone, bottom-up, to reproduce what the
  original model computes over its window (Adam on the MSE of hidden states; the first positions may be left
  out). Its inputs are the compressed model's own hidden states, through the layers already healed below it;
  the original model's layers come from a `LayerStack` (in memory or streamed one layer at a time). No
  gradient ever flows through more than the one layer being fitted.
- **lora**: LoRA adapters (peft) on q, k, v, o, gate, up, down with the paper's recipe (r 8, alpha 16,
  dropout 0.05, AdamW at 1e-4, effective batch 64, 2 epochs, cutoff 256, 100 warm-up steps then linear
  decay), merged into the weights at the end. This module holds the data, the schedule and one optimizer
  step of one data-parallel worker (`LoraTrainer`); `jobs/heal.py` runs the workers with Ray Train.

Training data (`load_examples`): instruction records (`instruction`, optional `input`, `output`), rendered with
the Alpaca template and with the prompt masked from the loss; or plain text, packed into `cutoff`-token
pieces with the language-model loss on every token; or pre-tokenized Parquet rows (`input_ids`).
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from swm_ray.errors import UserError
from swm_ray.io import fs as storage

IGNORE = -100  # label of a token left out of the loss (the prompt, padding)
PROMPT = ("Below is an instruction that describes a task, paired with an input that provides further context. "
          "Write a response that appropriately completes the request.\n\n"
          "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
PROMPT_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                   "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
RECORD_FIELDS = ("instruction", "output")
DEFAULT_LR = {"lora": 1e-4, "local": 3e-4}
DEFAULT_LOCAL_STEPS = 400


# -- training data ----------------------------------------------------------------------------------------------
@dataclass
class Examples:
    """Tokenized training examples: `input_ids[i]` and `labels[i]` (same length, IGNORE where no loss)."""

    input_ids: list[np.ndarray]
    labels: list[np.ndarray]
    kind: str  # instruction | text | tokens
    source: str
    skipped: int = 0  # instruction records whose response was cut away entirely by the cutoff

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def tokens(self) -> int:
        return int(sum(len(x) for x in self.input_ids))

    def loss_tokens(self, idx: Sequence[int]) -> int:
        """Tokens predicted (with a label) over examples `idx`: the first position predicts nothing."""
        return int(sum((self.labels[i][1:] != IGNORE).sum() for i in idx))


def render_prompt(instruction: str, input_text: str = "") -> str:
    """The Alpaca prompt of an instruction record (the part masked from the loss)."""
    if input_text and str(input_text).strip():
        return PROMPT.format(instruction=instruction, input=input_text)
    return PROMPT_NO_INPUT.format(instruction=instruction)


def _suffix(source: str) -> str:
    name = source.rsplit("/", 1)[-1].lower().removesuffix(".gz")
    return name.rsplit(".", 1)[-1] if "." in name else ""


def _json_objects(source: str) -> list:
    import gzip

    raw = storage.read_bytes(source)
    if source.lower().endswith(".gz"):
        raw = gzip.decompress(raw)
    text = raw.decode("utf-8", errors="replace").strip()
    if text.startswith("["):
        try:
            return list(json.loads(text))
        except json.JSONDecodeError as e:
            raise UserError(f"data {source}: not valid JSON ({e.msg} at line {e.lineno})") from None
    objects = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                objects.append(json.loads(line))
            except json.JSONDecodeError:
                raise UserError(f"data {source}: line {n} is not JSON") from None
    return objects


def read_training_rows(source: str, text_column: str = "text") -> tuple[str, list]:
    """("instruction", records) | ("text", strings) | ("tokens", id lists) from a data source."""
    from swm_ray.io import data

    kind = _suffix(source)
    if source.startswith("builtin:") or kind not in ("parquet", "json", "jsonl"):
        return "text", data.load_texts(source, text_column)
    if not storage.is_remote(source) and not Path(source).exists():
        raise UserError(f"data {source}: file not found")
    if kind == "parquet":
        import pyarrow.parquet as pq

        fs, path = storage.arrow_filesystem(source)
        try:
            schema = pq.read_schema(path, filesystem=fs)
        except (OSError, ValueError) as e:
            raise UserError(f"data {source}: cannot read Parquet ({str(e).splitlines()[0][:160]})") from None
        if all(f in schema.names for f in RECORD_FIELDS):
            return "instruction", pq.read_table(path, filesystem=fs).to_pylist()
        rows = data.load_rows(source, text_column)
        return ("tokens" if rows and not isinstance(rows[0], str) else "text"), rows
    objects = _json_objects(source)
    if not objects:
        raise UserError(f"data {source}: no rows")
    first = objects[0]
    if not isinstance(first, dict):
        raise UserError(f"data {source}: expected JSON objects (records), got {type(first).__name__}")
    if all(f in first for f in RECORD_FIELDS):
        return "instruction", objects
    if text_column in first:
        return "text", [str(o[text_column]) for o in objects if isinstance(o, dict) and o.get(text_column)]
    raise UserError(f"data {source}: records need the fields instruction and output (instruction data) or "
                    f"{text_column!r} (plain text); the first has {sorted(first)[:6]}")


def _instruction_examples(records: list[dict], tokenizer, cutoff: int, bos: bool, source: str) -> Examples:
    for n, r in enumerate(records, 1):
        if not isinstance(r, dict) or any(f not in r for f in RECORD_FIELDS):
            raise UserError(f"data {source}: record {n} lacks the field instruction or output")
    prompts = [render_prompt(str(r["instruction"]), str(r.get("input") or "")) for r in records]
    answers = [str(r["output"]) for r in records]
    head = [tokenizer.bos_token_id] if bos else []
    tail = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids, labels, skipped = [], [], 0
    for start in range(0, len(records), 512):
        p_ids = tokenizer(prompts[start:start + 512], add_special_tokens=False)["input_ids"]
        o_ids = tokenizer(answers[start:start + 512], add_special_tokens=False)["input_ids"]
        for p, o in zip(p_ids, o_ids):
            prompt = head + p
            full = (prompt + o + tail)[:cutoff]
            lab = ([IGNORE] * len(prompt) + o + tail)[:cutoff]
            if all(t == IGNORE for t in lab[1:]):
                skipped += 1
                continue
            ids.append(np.asarray(full, dtype=np.int64))
            labels.append(np.asarray(lab, dtype=np.int64))
    return Examples(ids, labels, "instruction", source, skipped)


def _text_examples(texts: list[str], tokenizer, cutoff: int, bos: bool, source: str,
                   max_examples: int | None) -> Examples:
    """Concatenate the texts (EOS between them) and cut the stream into `cutoff`-token pieces."""
    body = cutoff - 1 if bos else cutoff
    sep = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    stream: list[int] = []
    for start in range(0, len(texts), 512):
        for ids in tokenizer(texts[start:start + 512], add_special_tokens=False)["input_ids"]:
            stream.extend(ids + sep)
        if max_examples is not None and len(stream) >= body * max_examples:
            break
    pieces = [stream[i:i + body] for i in range(0, len(stream) - body + 1, body)]
    if bos:
        pieces = [[tokenizer.bos_token_id] + p for p in pieces]
    arrays = [np.asarray(p, dtype=np.int64) for p in pieces]
    return Examples(arrays, [a.copy() for a in arrays], "text", source)


def load_examples(source: str, tokenizer, *, cutoff: int, text_column: str = "text", max_examples: int | None = None,
                  bos: bool = False) -> Examples:
    """The training examples of `source` (see the module docstring); UserError when there are none."""
    kind, rows = read_training_rows(source, text_column)
    if kind == "instruction":
        ex = _instruction_examples(rows[:max_examples] if max_examples else rows, tokenizer, cutoff, bos, source)
    elif kind == "tokens":
        rows = rows[:max_examples] if max_examples else rows
        arrays = [np.asarray(r[:cutoff], dtype=np.int64) for r in rows if len(r) >= 2]
        ex = Examples(arrays, [a.copy() for a in arrays], "tokens", source)
    else:
        ex = _text_examples(rows, tokenizer, cutoff, bos, source, max_examples)
    if max_examples is not None:
        ex.input_ids, ex.labels = ex.input_ids[:max_examples], ex.labels[:max_examples]
    if not len(ex):
        what = "records with a response inside the cutoff" if kind == "instruction" else f"{cutoff}-token pieces"
        raise UserError(f"data {source}: no training examples ({what}); give more text or lower heal.cutoff")
    return ex


# -- the LoRA schedule ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Schedule:
    """Which examples every optimizer step uses, and its learning rate.

    Step `s` (0-based) of epoch `e` takes the next `batch_size` examples of a permutation seeded by (seed, e);
    a worker of `world` takes every world-th of them. The global batch, the loss (summed over the batch's
    predicted tokens, divided by their count) and so the gradient do not depend on the number of workers.
    The learning rate follows transformers' linear schedule: warm-up from 0, then linear decay to 0.
    """

    examples: int
    batch_size: int
    total_steps: int
    warmup_steps: int
    seed: int

    @classmethod
    def of(cls, examples: int, batch_size: int, epochs: float, steps: int | None, warmup: int, seed: int) -> Schedule:
        per_epoch = math.ceil(examples / batch_size)
        total = steps if steps is not None else max(1, math.ceil(epochs * per_epoch))
        return cls(examples, batch_size, total, warmup, seed)

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.examples / self.batch_size)

    def batch(self, step: int) -> np.ndarray:
        epoch, k = divmod(step, self.steps_per_epoch)
        perm = np.random.default_rng([self.seed, epoch]).permutation(self.examples)
        return perm[k * self.batch_size:(k + 1) * self.batch_size]

    def lr_factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return step / max(1, self.warmup_steps)
        return max(0.0, (self.total_steps - step) / max(1, self.total_steps - self.warmup_steps))


def collate(ex: Examples, idx: Sequence[int], pad_id: int, device) -> dict[str, torch.Tensor]:
    """Right-padded tensors (b, T) of examples `idx`: input_ids, attention_mask, labels (IGNORE on padding)."""
    width = max(len(ex.input_ids[i]) for i in idx)
    ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
    labels = torch.full((len(idx), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(idx), width), dtype=torch.long)
    for row, i in enumerate(idx):
        n = len(ex.input_ids[i])
        ids[row, :n] = torch.tensor(ex.input_ids[i])  # object-store arrays are read-only: copy
        labels[row, :n] = torch.tensor(ex.labels[i])
        mask[row, :n] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


def nll_sum(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed next-token NLL over the labelled positions of `batch` (a scalar with grad)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(),
                                       ignore_index=IGNORE, reduction="sum")


# -- LoRA --------------------------------------------------------------------------------------------------------
def lora_config(h):
    """peft's LoraConfig of a HealConfig (targets as given; `lora_targets` checks they exist)."""
    from peft import LoraConfig

    return LoraConfig(r=h.lora_r, lora_alpha=h.lora_alpha, lora_dropout=h.lora_dropout,
                      target_modules=list(h.target_modules), bias="none", task_type="CAUSAL_LM")


def lora_targets(model: nn.Module, wanted: Sequence[str]) -> list[str]:
    """The names of `wanted` that are linear layers of `model`; UserError when one is missing."""
    have = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    missing = [w for w in wanted if w not in have]
    if missing:
        raise UserError(f"heal.target_modules: {missing} are not linear layers of this model (it has "
                        f"{sorted(have)[:12]}); set --set heal.target_modules=[...]")
    return list(wanted)


def apply_lora(model: nn.Module, h, seed: int | None = None):
    """`model` wrapped by peft with fresh LoRA adapters (A random, B zero: the model is unchanged)."""
    from peft import get_peft_model

    lora_targets(model, h.target_modules)
    if seed is not None:
        torch.manual_seed(seed)
    return get_peft_model(model, lora_config(h))


def adapter_state(peft_model) -> dict[str, torch.Tensor]:
    """The adapter's tensors (peft's names, CPU copies)."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().to("cpu").clone() for k, v in get_peft_model_state_dict(peft_model).items()}


def load_adapter_state(peft_model, state: dict[str, torch.Tensor]) -> None:
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(peft_model, state)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise RuntimeError(f"adapter tensors {unexpected[:3]} do not fit the model")


@torch.no_grad()
def merge_adapter(base: nn.Module, state: dict[str, torch.Tensor], h, adapter_dir: str | Path | None = None):
    """`base` with the adapter merged into its weights: W + (alpha / r) · B A for every target. When
    `adapter_dir` is given the adapter alone is saved there first (peft's folder: adapter_config.json,
    adapter_model.safetensors). Returns the plain transformers model."""
    peft_model = apply_lora(base, h)
    load_adapter_state(peft_model, state)
    if adapter_dir is not None:
        peft_model.save_pretrained(str(adapter_dir))
    return peft_model.merge_and_unload()


class LoraTrainer:
    """One data-parallel worker's optimizer steps over a peft model.

    `all_reduce(t)` sums a tensor over the workers in place (identity for one worker): gradients are summed
    after each step's local micro-batches, so every worker applies the same update to the same adapter.
    """

    def __init__(self, model: nn.Module, examples: Examples, schedule: Schedule, h, *, device, pad_id: int,
                 rank: int = 0, world: int = 1, all_reduce: Callable[[torch.Tensor], None] | None = None):
        self.model = model
        self.examples = examples
        self.schedule = schedule
        self.h = h
        self.device = device
        self.pad_id = pad_id
        self.rank, self.world = rank, world
        self.all_reduce = all_reduce or (lambda t: None)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.base_lr = h.lr or DEFAULT_LR["lora"]
        self.optimizer = torch.optim.AdamW(self.params, lr=self.base_lr, weight_decay=0.0)

    def step(self, step: int) -> dict[str, float]:
        """Optimizer step `step`; returns the global batch's mean loss and its token counts."""
        idx = self.schedule.batch(step)
        n_loss = self.examples.loss_tokens(idx)
        mine = idx[self.rank::self.world]
        lr = self.base_lr * self.schedule.lr_factor(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        torch.manual_seed(hash((self.schedule.seed, self.rank, step)) % 2**31)  # dropout: same on a resumed run
        total = torch.zeros(2, dtype=torch.float64, device=self.device)  # loss sum, input tokens
        mb = self.h.micro_batch_size
        for start in range(0, len(mine), mb):
            batch = collate(self.examples, mine[start:start + mb], self.pad_id, self.device)
            loss = nll_sum(self.model, batch)
            (loss / max(1, n_loss)).backward()
            total[0] += loss.detach().double()
            total[1] += batch["attention_mask"].sum()
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in self.params])
        self.all_reduce(flat)
        self.all_reduce(total)
        offset = 0
        for p in self.params:
            p.grad = flat[offset:offset + p.numel()].view_as(p).to(p.dtype)
            offset += p.numel()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"loss": float(total[0]) / max(1, n_loss), "tokens": int(total[1]), "lr": lr}


def lora_data(cfg, tokenizer, model_type: str | None, data: str) -> tuple[Examples, Schedule]:
    """The LoRA training examples of `data` and their schedule under `cfg.heal` (shared by `swm-ray heal` and the
    grid's in-process healing)."""
    from swm_ray.io.data import wants_bos

    h = cfg.heal
    bos = wants_bos(tokenizer, model_type, cfg.data.bos)
    examples = load_examples(data, tokenizer, cutoff=h.cutoff, text_column=cfg.data.text_column,
                             max_examples=h.max_examples, bos=bos)
    return examples, Schedule.of(len(examples), h.batch_size, h.epochs, h.steps, h.warmup_steps, h.seed)


def lora_in_process(model: nn.Module, examples: Examples, schedule: Schedule, h, *, device, pad_id: int | None):
    """LoRA on `model` in this process (one worker: no Ray Train), every step of `schedule`, the adapter merged
    into the weights at the end. Returns (the plain merged model, the per-step history)."""
    pad = pad_id if pad_id is not None else 0
    use_cache = getattr(model.config, "use_cache", None)
    model.config.use_cache = False
    peft_model = apply_lora(model, h, seed=h.seed)
    trainer = LoraTrainer(peft_model, examples, schedule, h, device=device, pad_id=pad)
    history = []
    for step in range(schedule.total_steps):
        t0 = time.perf_counter()
        m = trainer.step(step)
        history.append({"step": step + 1, "loss": round(m["loss"], 6), "lr": m["lr"], "tokens": m["tokens"],
                        "seconds": round(time.perf_counter() - t0, 4)})
    merged = peft_model.merge_and_unload().eval()
    merged.config.use_cache = use_cache
    return merged, history


# -- local: each merged layer refit to its window ------------------------------------------------------------
def _plain(obj: Any) -> Any:
    """A copy of `obj` whose tensors are ordinary (inference-mode tensors cannot enter autograd)."""
    if isinstance(obj, torch.Tensor):
        return obj.clone()
    if isinstance(obj, tuple):
        return tuple(_plain(o) for o in obj)
    if isinstance(obj, list):
        return [_plain(o) for o in obj]
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    return obj


def _run(layer: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    from swm_ray.compute.stack import first_tensor

    return first_tensor(layer(hidden, **kwargs))


def fit_error(layer: nn.Module, inputs: list[torch.Tensor], targets: list[torch.Tensor], kwargs: list[dict],
              skip: int) -> float:
    """Relative squared error of `layer` over all rows: Σ‖f(x) − y‖² / Σ‖y‖², positions ≥ skip."""
    num = den = 0.0
    with torch.no_grad():
        for x, y, kw in zip(inputs, targets, kwargs):
            out = _run(layer, x, kw)[:, skip:].float()
            y = y[:, skip:].float()
            num += float(((out - y) ** 2).sum())
            den += float((y ** 2).sum())
    return num / max(den, 1e-30)


def fit_layer(layer: nn.Module, inputs: list[torch.Tensor], targets: list[torch.Tensor], kwargs: list[dict], *,
              steps: int, lr: float, skip: int, seed: int) -> list[float]:
    """Adam on `layer`'s weights alone: each step one minibatch, MSE between its output and the target at
    positions ≥ skip. Returns the per-step losses."""
    params = list(layer.parameters())
    saved = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    rng = np.random.default_rng(seed)
    losses = []
    try:
        with torch.enable_grad():
            for _ in range(steps):
                b = int(rng.integers(len(inputs)))
                out = _run(layer, inputs[b], kwargs[b])
                loss = nn.functional.mse_loss(out[:, skip:].float(), targets[b][:, skip:].float())
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
    finally:
        for p, s in zip(params, saved):
            p.requires_grad_(s)
            p.grad = None
    return losses


def positions_of(plan) -> list[tuple[int, int]]:
    """(low, high) original layers behind each layer of the compressed model, bottom first."""
    from swm_ray.edits.merge import new_layer_sources

    return [(low, high) for low, high, _ in new_layer_sources(plan.num_layers_before, plan.windows, None)]


@dataclass
class LocalFit:
    """What fitting one merged layer did (relative squared errors, see `fit_error`)."""

    window: list[int]
    position: int
    error_before: float
    error_after: float
    steps: int
    first_loss: float
    last_loss: float
    seconds: float


def heal_local(model: nn.Module, source, plan, input_ids: torch.Tensor, *, steps: int, lr: float, rows: int,
               skip: int, target: str = "original", seed: int = 0,
               on_fit: Callable[[LocalFit], None] | None = None) -> list[LocalFit]:
    """Refit every merged layer of `model` (the compressed model, in memory, trained in place) bottom-up.

    `source`: a `LayerStack` of the original model (in memory or streaming); `plan`: the compressed model's
    plan; `input_ids` (N, T): calibration rows, run in minibatches of `rows`. A merged layer at position p of
    window [low, high] learns from the compressed model's hidden states entering p (through the layers already
    healed below it) either the original model's hidden state after layer `high` (`target="original"`) or the
    output of the original layers low..high on the same input (`"window"`).
    """
    from swm_ray.compute.stack import InMemoryStack

    comp = InMemoryStack(model)
    pos = positions_of(plan)
    if comp.num_layers != len(pos):
        raise UserError(f"the model has {comp.num_layers} decoder layers but its plan.json describes "
                        f"{len(pos)}: it is not the folder the plan was written with")
    if source.num_layers != plan.num_layers_before:
        raise UserError(f"the source model has {source.num_layers} decoder layers, plan.json says "
                        f"{plan.num_layers_before}: give the model the plan was made from (heal.source)")
    merged = [p for p, (low, high) in enumerate(pos) if high > low]
    if not merged:
        return []
    model.requires_grad_(False)
    chunks = [input_ids[i:i + rows] for i in range(0, len(input_ids), rows)]
    pro_c = [comp.prologue(c) for c in chunks]
    pro_o = [source.prologue(c) for c in chunks]
    hc = [_plain(p.hidden) for p in pro_c]
    ho = [_plain(p.hidden).to(source.device) for p in pro_o]
    kw_c = [[_plain(k) for k in p.kwargs] for p in pro_c]
    kw_o = [p.kwargs for p in pro_o]

    def advance(hidden: list[torch.Tensor], low: int, high: int) -> list[torch.Tensor]:
        """The original layers low..high applied to every chunk of `hidden` (one layer resident at a time)."""
        out = list(hidden)
        for k in range(low, high + 1):
            with source.layer(k) as layer, torch.no_grad():
                dev = next(layer.parameters()).device
                out = [source.run(layer, h.to(dev), kw_o[b][k]).clone() for b, h in enumerate(out)]
        return out

    fits: list[LocalFit] = []
    for p in range(merged[-1] + 1):
        low, high = pos[p]
        layer = comp.layers[p]
        kw = [k[p] for k in kw_c]
        if high == low:
            if target == "original":
                ho = advance(ho, low, low)
            with torch.no_grad():
                hc = [_run(layer, h, k) for h, k in zip(hc, kw)]
            continue
        t0 = time.perf_counter()
        if target == "original":
            ho = advance(ho, low, high)
            goal = [h.to(comp.device) for h in ho]
        else:
            goal = [h.to(comp.device) for h in advance([h.to(source.device) for h in hc], low, high)]
        before = fit_error(layer, hc, goal, kw, skip)
        losses = fit_layer(layer, hc, goal, kw, steps=steps, lr=lr, skip=skip, seed=seed + p)
        after = fit_error(layer, hc, goal, kw, skip)
        fit = LocalFit([low, high], p, before, after, steps, losses[0] if losses else float("nan"),
                       losses[-1] if losses else float("nan"), round(time.perf_counter() - t0, 2))
        fits.append(fit)
        if on_fit is not None:
            on_fit(fit)
        with torch.no_grad():
            hc = [_run(layer, h, k) for h, k in zip(hc, kw)]
    return fits


@dataclass
class LocalSettings:
    """What `heal_local` is run with under a config's `heal` section (its defaults resolved)."""

    calib: Any  # data.Calibration: the rows the merged layers are refit on
    steps: int
    lr: float
    rows: int
    skip: int
    target: str
    seed: int

    def run(self, model: nn.Module, source, plan, on_fit: Callable[[LocalFit], None] | None = None) -> list[LocalFit]:
        return heal_local(model, source, plan, torch.from_numpy(self.calib.input_ids), steps=self.steps, lr=self.lr,
                          rows=self.rows, skip=self.skip, target=self.target, seed=self.seed, on_fit=on_fit)

    def record(self, source: str) -> dict:
        """The settings as kept in heal.json."""
        return {"lr": self.lr, "steps": self.steps, "local_target": self.target, "skip_first_tokens": self.skip,
                "samples": int(self.calib.input_ids.shape[0]), "seq_len": int(self.calib.input_ids.shape[1]),
                "rows_per_step": self.rows, "source": source}


def local_settings(cfg, tokenizer, model_type: str | None, data: str) -> LocalSettings:
    """`heal.*` resolved for a local heal: `heal.local_samples` × `heal.local_seq_len` calibration rows of
    `data`, `heal.steps` (default DEFAULT_LOCAL_STEPS) per merged layer at `heal.lr` (default DEFAULT_LR)."""
    from swm_ray.io.data import build_calibration

    h, d = cfg.heal, cfg.data
    calib = build_calibration(data, tokenizer, samples=h.local_samples, seq_len=h.local_seq_len, batch_size=4,
                              seed=h.seed, mode=d.mode, bos=d.bos, model_type=model_type, text_column=d.text_column)
    return LocalSettings(calib, h.steps or DEFAULT_LOCAL_STEPS, h.lr or DEFAULT_LR["local"], h.micro_batch_size,
                         h.skip_first_tokens, h.local_target, h.seed)


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
        lines = [f"Each merged layer was refit alone to the original model's output over its window "
                 f"(`swm-ray heal --mode local`): {record.steps} Adam steps per layer at lr {s.get('lr')}, "
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
    return "## Healing\n\n" + "\n".join(lines) + "\n"


def healed_card(plan, record: HealRecord, *, metrics: dict | None, resolved_yaml: str, name: str) -> str:
    """The model card of a healed folder: `compress`'s card with a Healing section before its Metrics."""
    from swm_ray.plan.writer import render_model_card

    card = render_model_card(plan, metrics=metrics, resolved_yaml=resolved_yaml, name=name)
    section = render_heal_section(record)
    anchor = next((a for a in ("## Metrics\n", "## How to load\n") if a in card), None)
    if anchor is None:
        return card + "\n" + section
    head, tail = card[:card.index(anchor)], card[card.index(anchor):]
    if not plan.windows:  # a model swm-ray did not compress: no merge plan to describe
        head = head[:head.index("Produced by")] + f"Healed by **swm-ray** from `{record.source_folder}`.\n\n"
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
        with storage.open_output(out, overwrite=overwrite) as sink:
            sink.put_dir(local)
    return out if storage.is_remote(out) else str(Path(out).resolve())


def update_healed_metrics(out: str, plan, record: HealRecord, metrics: dict, resolved_yaml: str) -> None:
    """Put evaluation metrics into a healed folder: `metrics.json` and the card (Healing section kept)."""
    card = healed_card(plan, record, metrics=metrics, resolved_yaml=resolved_yaml, name=Path(str(out)).name)
    files = {"metrics.json": json.dumps(metrics, indent=2, default=str) + "\n", "README.md": card}
    for fname, text in files.items():
        storage.replace_file(f"{out.rstrip('/')}/{fname}", text.encode())
