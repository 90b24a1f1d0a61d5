"""LoRA healing: adapters (peft) on q, k, v, o, gate, up, down with the paper's recipe (r 8, alpha 16,
dropout 0.05, AdamW at 1e-4, effective batch 64, 2 epochs, cutoff 256, 100 warm-up steps then linear decay),
merged into the weights at the end. This module holds the schedule and one optimizer step of one data-parallel
worker (`LoraTrainer`); `jobs/heal.py` runs the workers with Ray Train. Healing has two modes, both ending in
a plain model folder (`folder.py`): this one and the layer-local refit (`local.py`); the training data is
`examples.py`'s.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from swm_ray.errors import UserError
from swm_ray.heal.examples import IGNORE, Examples, load_examples

DEFAULT_LR = {"lora": 1e-4, "local": 3e-4}


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
        lr = self.base_lr * self.schedule.lr_factor(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        total = torch.zeros(2, dtype=torch.float64, device=self.device)  # loss sum, input tokens
        mb = self.h.micro_batch_size
        # the global batch in fixed micro-batches, dealt round-robin to the workers, each with its own dropout
        # seed: the same micro-batches and masks whatever the number of workers, and on a resumed run
        for j in range(self.rank, -(-len(idx) // mb), self.world):
            torch.manual_seed(hash((self.schedule.seed, step, j)) % 2**31)
            batch = collate(self.examples, idx[j * mb:(j + 1) * mb], self.pad_id, self.device)
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
