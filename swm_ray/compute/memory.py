"""Memory budgets: how much an actor (or this process) may hold, and whether a model fits it or must stream.

A budget covers tensors: weights, activations and the merged layers being built; the interpreter and the
libraries come on top (about 0.4-0.6 GB of RSS for a process with torch and transformers loaded). Default
budget: the free memory of the actor's GPU(s), or on the CPU its share of the host's available memory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from swm_ray.errors import UserError
from swm_ray.io.sizes import parse_size

IN_MEMORY_HEADROOM = 0.8  # a model is held whole when its weights take at most this much of the budget


def fmt_bytes(n: float) -> str:
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def host_available() -> int:
    """Bytes of host memory available now (MemAvailable), or the physical total where /proc is missing."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def device_budget(device: str, gpus: int = 1, share: int = 1) -> int:
    """Free memory of the devices an actor owns: its CUDA devices (all visible ones up to `gpus`), or a
    `share`-th of the host's available memory on the CPU."""
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        first = torch.device(device).index or 0
        ids = range(first, min(torch.cuda.device_count(), first + max(1, gpus)))
        return int(sum(torch.cuda.mem_get_info(i)[0] for i in ids) * 0.9)
    return int(host_available() * 0.8 / max(1, share))


@dataclass(frozen=True)
class Footprint:
    """Sizes (bytes, at the compute dtype) that decide how a model runs."""

    weights: int  # every tensor
    resident: int  # what stays loaded when streaming: embeddings, final norm, LM head
    largest_layer: int
    stream_bytes: int  # one stream of hidden states of the shard (rows × tokens × hidden × 4)

    @property
    def streaming_floor(self) -> int:
        """Least a streaming run needs: the resident part, three layers (the current one, a candidate's merged
        one and the state kept to build the next), and two streams (the current model's and one candidate's)."""
        return self.resident + 3 * self.largest_layer + 2 * self.stream_bytes

    def fits_in_memory(self, budget: int) -> bool:
        return self.weights + 2 * self.stream_bytes <= IN_MEMORY_HEADROOM * budget

    def max_streams(self, budget: int) -> int:
        """Candidate streams a streaming pass may keep at once within `budget` (at least 1); a tenth of the
        budget is left for the small buffers around them (reference outputs, masks, a norm's output)."""
        spare = 0.9 * budget - self.resident - 3 * self.largest_layer - self.stream_bytes
        return max(1, int(spare // max(1, self.stream_bytes)))


def choose_mode(stream: str, footprint: Footprint, budget: int, what: str, stream_budget: int | None = None) -> str:
    """'memory' or 'stream' for `stream` = auto | always | never; UserError when nothing fits the budget.
    `stream_budget`: the budget of a streaming run where it differs (a model in memory may spread over an actor's
    GPUs; a streaming run computes on one of them)."""
    if stream == "never":
        return "memory"
    if stream == "auto" and footprint.fits_in_memory(budget):
        return "memory"
    budget = budget if stream_budget is None else stream_budget
    if footprint.streaming_floor > budget:
        raise UserError(
            f"{what} needs at least {fmt_bytes(footprint.streaming_floor)} even one layer at a time (embeddings and "
            f"LM head {fmt_bytes(footprint.resident)}, a layer {fmt_bytes(footprint.largest_layer)}) but the budget "
            f"is {fmt_bytes(budget)}: raise --max-memory, use GPUs with more memory, or --gpus-per-actor")
    return "stream"


def weights_dtype_bytes(dtype) -> int:
    import torch

    return torch.empty((), dtype=dtype).element_size()


def footprint(ckpt, config, dtype, rows: int, seq_len: int) -> Footprint:
    """The `Footprint` of a checkpoint (`checkpoint.Checkpoint`) run at the torch `dtype` on a shard of
    `rows` × `seq_len` tokens."""
    from swm_ray.io.anatomy import text_config_of

    tcfg = text_config_of(config)
    scale = weights_dtype_bytes(dtype)
    numel = lambda keys: sum(ckpt.infos[k].numel for k in keys)  # noqa: E731
    tied = bool(getattr(tcfg, "tie_word_embeddings", getattr(config, "tie_word_embeddings", False)))
    largest = max((numel(ckpt.layer_keys(i).values()) for i in range(ckpt.num_layers)), default=0)
    return Footprint(
        weights=ckpt.param_count(tied) * scale,
        resident=numel(ckpt.other_keys()) * scale,
        largest_layer=largest * scale,
        stream_bytes=max(1, rows) * max(1, seq_len) * int(tcfg.hidden_size) * 4,
    )


def check_budget(model_cfg, path: str, dtype: str, rows: int, seq_len: int) -> None:
    """With a budget given (`model.max_memory`), the check each actor makes when it opens the model
    (`stack.open_stack`), made first from the checkpoint's headers at `path`: a budget below one layer is a
    one-line UserError before any actor is placed. `dtype`: what the actors compute in; `rows`: an actor's share.
    Without a budget there is nothing to check here: each actor's default depends on its own device."""
    if model_cfg.max_memory is None:
        return
    import torch

    from swm_ray.io.checkpoint import Checkpoint
    from swm_ray.io.models import load_config

    fp = footprint(Checkpoint(path, model_cfg.allow_pickle), load_config(path, model_cfg.trust_remote_code),
                   getattr(torch, dtype), rows, seq_len)
    choose_mode(model_cfg.stream, fp, parse_size(model_cfg.max_memory), f"model {path}")


def return_freed_memory() -> bool:
    """Make this process hand freed blocks of 1 MiB or more straight back to the OS (glibc only).

    Layer streaming allocates and frees a layer's tensors (a few MB each) over and over, interleaved with
    activations of other lifetimes. glibc raises its mmap threshold after such frees (up to 32 MiB), after
    which those blocks come from the heap, fragment it, and the process keeps the high-water mark of every
    layer it ever held: measured on a 32-layer model, 1.27 GB above the interpreter instead of 0.72 GB.
    Fixing the threshold at 1 MiB (M_MMAP_THRESHOLD, which also stops the adjustment) keeps a streaming
    process's memory at what it holds. Returns False where it does not apply (not glibc)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(-3, 1 << 20))  # M_MMAP_THRESHOLD = -3
    except (OSError, AttributeError):
        return False


def return_freed() -> None:
    """Collect garbage and hand freed heap pages back to the system (glibc `malloc_trim`), so a stage that
    dropped a model or cached hidden states leaves room in the process's resident memory for the next stage
    (the allocator otherwise keeps them, and RSS stays at the high-water mark). No-op where there is no glibc."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
