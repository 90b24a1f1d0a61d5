"""Producers of layer-by-layer hidden states: one interface for a model held whole in memory (on one device,
or spread over several by accelerate's device map) and for layer streaming.

Consumers (statistics, candidate scores, Block Influence, perplexity) are written against `LayerStack`:

- `prologue(ids)`: the hidden state entering decoder layer 0 and the keyword arguments every original layer
  is called with (attention masks, rotary embeddings), computed by the model's own forward with the decoder
  layers swapped for recorders, so masks and RoPE are exactly the model's for every architecture.
- `group(low, high, method, attention)`: a context manager yielding one decoder layer: original layer
  `low` when `low == high`, else the merged layer of the window (see `merge.py`). In memory a single layer is
  the model's own module; streaming builds it from the safetensors files (only that layer's tensors, read
  with `Checkpoint`) on the compute device and frees it on exit.
- `run(layer, hidden, kwargs)`, `final(hidden)` (the final norm), `logits(hidden)`.

`StreamingStack` keeps only the embeddings, the final norm and the LM head resident; its peak memory is
those plus one or two layers plus the activations the consumer keeps, whatever the depth.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from swm_ray.edits.merge import copy_layer, merge_tensor, set_layer_index
from swm_ray.edits.windows import anchor_layer, layer_types_of
from swm_ray.errors import UserError
from swm_ray.io.anatomy import decoder_layers, inner_model, text_config, text_config_of
from swm_ray.io.checkpoint import Checkpoint

State = dict[str, torch.Tensor]


def first_tensor(x):
    """Decoder layers return a tensor (transformers 5) or a tuple whose first entry is the hidden state."""
    return x[0] if isinstance(x, (tuple, list)) else x


@dataclass
class Prologue:
    """What enters the decoder stack for one batch of rows: `hidden` (b, T, d) and per original layer the
    keyword arguments of its call (shared objects where layers share them)."""

    hidden: torch.Tensor
    kwargs: list[dict] = field(default_factory=list)


class _Recorder(nn.Module):
    """Stands in for decoder layer i during a prologue: keeps its call's kwargs, returns its input."""

    def __init__(self, template: nn.Module, sink: list):
        super().__init__()
        self.sink = sink
        for attr in ("attention_type", "layer_type", "is_sliding"):
            if hasattr(template, attr):
                setattr(self, attr, getattr(template, attr))

    def forward(self, hidden_states, *args, **kwargs):
        kw = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value")}
        kw["use_cache"] = False
        self.sink.append((hidden_states, kw))
        return hidden_states


def _move(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_move(o, device) for o in obj)
    if isinstance(obj, list):
        return [_move(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _move(v, device) for k, v in obj.items()}
    return obj


def module_device(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


class LayerStack:
    """Shared part of both producers (see the module docstring)."""

    streaming = False

    def __init__(self, causal_lm: nn.Module, config, templates: Sequence[nn.Module], device: torch.device,
                 dtype: torch.dtype):
        self.model = causal_lm  # holds embeddings, final norm, LM head (and, in memory, the layers)
        self.inner = inner_model(causal_lm)
        self.config = config  # the text config of the FULL original stack
        self.templates = list(templates)
        self.num_layers = len(self.templates)
        self.layer_types = layer_types_of(config)
        self.device = device
        self.dtype = dtype
        self.layer_loads = 0  # layers built or read (streaming: from disk), for benchmarks and tests
        self.token_runs = 0  # tokens run through a decoder layer (a pass over N tokens of an L-layer model adds N·L)

    # -- the part below the first layer and above the last -------------------------------------------------
    @torch.inference_mode()
    def prologue(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None) -> Prologue:
        """The rows' embeddings and every layer's call arguments; `position_ids` and a 4D `attention_mask`
        (additive, (b, 1, T, T)) where rows are not plain causal sequences (`validation.plans_logliks` packs
        choices that share a context into one row)."""
        sink: list = []
        saved_layers, saved_cfg = self.inner.layers, self.inner.config
        self.inner.layers = nn.ModuleList([_Recorder(t, sink) for t in self.templates])
        self.inner.config = self.config
        extra = {k: v.to(self.device) for k, v in (("position_ids", position_ids), ("attention_mask", attention_mask))
                 if v is not None}
        try:
            self.inner(input_ids=input_ids.to(self.device), use_cache=False, **extra)
        finally:
            self.inner.layers, self.inner.config = saved_layers, saved_cfg
        if len(sink) != self.num_layers:
            raise RuntimeError(f"the model called {len(sink)} of its {self.num_layers} decoder layers")
        return Prologue(sink[0][0], [kw for _, kw in sink])

    @torch.inference_mode()
    def final(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.inner.norm(hidden.to(module_device(self.inner.norm)))

    @torch.inference_mode()
    def logits(self, final_hidden: torch.Tensor) -> torch.Tensor:
        head = self.model.get_output_embeddings()
        logits = head(final_hidden.to(module_device(head))).float()
        cap = getattr(self.config, "final_logit_softcapping", None)  # Gemma 2/3
        return torch.tanh(logits / cap) * cap if cap else logits

    # -- layers --------------------------------------------------------------------------------------------
    def anchor(self, low: int, high: int, attention: str, method: str | None = None) -> int:
        return anchor_layer(self.layer_types, (low, high), attention, method)

    @torch.inference_mode()
    def run(self, layer: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
        dev = module_device(layer)
        self.token_runs += int(hidden.shape[0]) * int(hidden.shape[1])
        if hidden.device != dev:
            hidden, kwargs = hidden.to(dev), _move(kwargs, dev)
        return first_tensor(layer(hidden, **kwargs))

    def state(self, low: int, high: int, method: str) -> State:
        """The merged state of original layers low..high (one layer's own state when low == high)."""
        raise NotImplementedError

    def build(self, anchor: int, state: State, position: int | None = None) -> nn.Module:
        """A decoder layer module of `anchor`'s kind holding `state`, on the compute device."""
        raise NotImplementedError

    @contextlib.contextmanager
    def group(self, low: int, high: int, method: str = "reference", attention: str = "global") -> Iterator[nn.Module]:
        layer = self.build(self.anchor(low, high, attention, method), self.state(low, high, method), low)
        try:
            yield layer
        finally:
            del layer

    def layer(self, i: int):
        return self.group(i, i)


class InMemoryStack(LayerStack):
    """The whole model on its device(s); single layers are the model's own modules."""

    def __init__(self, model: nn.Module):
        layers = list(decoder_layers(model))
        p = next(model.parameters())
        super().__init__(model, text_config(model), layers, p.device, p.dtype)
        self.layers = layers

    def state(self, low: int, high: int, method: str) -> State:
        if low == high:
            return self.layers[low].state_dict()
        states = [self.layers[k].state_dict() for k in range(low, high + 1)]
        return {n: merge_tensor(n, lambda k, n=n: states[k][n], len(states), method, states[0]) for n in states[0]}

    def build(self, anchor: int, state: State, position: int | None = None) -> nn.Module:
        layer = copy_layer(self.layers[anchor])
        layer.load_state_dict(state, strict=True)
        if position is not None:
            set_layer_index(layer, position)
        self.layer_loads += 1
        return layer

    @contextlib.contextmanager
    def group(self, low: int, high: int, method: str = "reference", attention: str = "global") -> Iterator[nn.Module]:
        if low == high:
            yield self.layers[low]
            return
        with super().group(low, high, method, attention) as layer:
            yield layer


class StreamingStack(LayerStack):
    """Embeddings, final norm and LM head resident; decoder layers built from the checkpoint on demand."""

    streaming = True

    def __init__(self, ckpt, config, device: torch.device, dtype: torch.dtype, trust_remote_code: bool = False):
        """`ckpt`: a `Checkpoint` (or an executor's `PlanView`) and its model config."""
        from transformers import AutoModelForCausalLM
        from transformers.initialization import no_init_weights

        from swm_ray.compute.memory import return_freed_memory

        return_freed_memory()  # layers come and go: keep the process at what it holds (see there)
        self.ckpt = ckpt
        where = getattr(ckpt, "path", "the edited model")
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
        templates = list(decoder_layers(skeleton))
        if ckpt.num_layers != len(templates):
            raise UserError(f"model {where}: the checkpoint has {ckpt.num_layers} decoder layers, its config "
                            f"{len(templates)}")
        self._check_names(where, templates[0])
        shallow = copy.deepcopy(config)
        text_config_of(shallow).num_hidden_layers = 0  # builds embeddings, norm, RoPE (all layer types), LM head
        with no_init_weights(), torch.device(device):
            resident = AutoModelForCausalLM.from_config(shallow, dtype=dtype, trust_remote_code=trust_remote_code)
        self._load_resident(where, resident, device, dtype)
        resident.eval()
        super().__init__(resident, text_config_of(config), templates, torch.device(device), dtype)

    @classmethod
    def from_path(cls, path: str, device: torch.device, dtype: torch.dtype, allow_pickle: bool = False,
                  trust_remote_code: bool = False) -> StreamingStack:
        from swm_ray.io.models import load_config

        return cls(Checkpoint(path, allow_pickle), load_config(path, trust_remote_code), device, dtype,
                   trust_remote_code)

    def _check_names(self, path, template: nn.Module) -> None:
        want = set(template.state_dict())
        have = set(self.ckpt.layer_keys(0))
        if want != have:
            raise UserError(f"model {path}: checkpoint keys of layer 0 do not match the architecture "
                            f"({sorted(want ^ have)[:3]}...): stream it with --stream-layers off")

    def _load_resident(self, path, resident: nn.Module, device, dtype) -> None:
        wanted = set(resident.state_dict())
        state = {k: self.ckpt.read(k, dtype).to(device) for k in self.ckpt.other_keys() if k in wanted}
        missing, _ = resident.load_state_dict(state, strict=False, assign=True)
        head = resident.get_output_embeddings()
        if any(k.endswith("lm_head.weight") for k in missing) and head is not None:
            head.weight = resident.get_input_embeddings().weight  # tied embeddings: one tensor
            missing = [k for k in missing if not k.endswith("lm_head.weight")]
        if missing:
            raise UserError(f"model {path}: the checkpoint lacks {missing[:3]}")

    def state(self, low: int, high: int, method: str) -> State:
        keys = [self.ckpt.layer_keys(k) for k in range(low, high + 1)]
        touched: set[int] = set()  # the window's layers the merge reads a tensor of (keep-first: its first only)

        def read(k: int, n: str) -> torch.Tensor:
            touched.add(k)
            return self.ckpt.read(keys[k][n], self.dtype)

        state = {n: merge_tensor(n, lambda k, n=n: read(k, n), len(keys), method, keys[0]) for n in keys[0]}
        self.layer_loads += len(touched)
        return state

    def build(self, anchor: int, state: State, position: int | None = None) -> nn.Module:
        layer = copy_layer(self.templates[anchor])
        layer.load_state_dict({k: v.to(self.device) for k, v in state.items()}, strict=True, assign=True)
        if any(t.is_meta for t in layer.buffers()):
            raise UserError(f"{type(layer).__name__} keeps buffers outside its weights: layer streaming does not "
                            f"support it; use --stream-layers off")
        if position is not None:
            set_layer_index(layer, position)
        return layer.eval()


@dataclass
class StackSpec:
    """How to open a model: where it is, where and how to run it, and the memory it may use."""

    path: str
    device: str = "auto"
    dtype: str = "auto"
    stream: str = "auto"  # auto | always | never
    max_memory: str | int | None = None
    allow_pickle: bool = False
    trust_remote_code: bool = False
    gpus: int = 1
    share: int = 1  # actors sharing this host's memory (CPU budgets)


def open_stack(spec: StackSpec, rows: int = 0, seq_len: int = 0,
               on_mode: Callable[[dict], None] | None = None) -> LayerStack:
    """Open `spec.path` in memory or streaming, as its size, the budget and `spec.stream` decide."""
    from swm_ray.compute.memory import choose_mode, device_budget, footprint
    from swm_ray.io.models import load_config, load_model, pick_device, pick_dtype
    from swm_ray.io.sizes import parse_size

    dev = pick_device(spec.device)
    dtype = pick_dtype(spec.dtype, dev)
    ckpt = Checkpoint(spec.path, spec.allow_pickle)
    config = load_config(spec.path, spec.trust_remote_code)
    fp = footprint(ckpt, config, dtype, rows, seq_len)
    budget = parse_size(spec.max_memory) or device_budget(dev, spec.gpus, spec.share)
    # a model in memory spreads over the actor's GPUs (a device map); a streamed one runs on the first only
    one = budget if spec.gpus <= 1 else parse_size(spec.max_memory) or device_budget(dev, 1, spec.share)
    mode = choose_mode(spec.stream, fp, budget, f"model {spec.path}", stream_budget=one)
    if mode == "stream":
        budget = one
        stack: LayerStack = StreamingStack(ckpt, config, torch.device(dev), dtype, spec.trust_remote_code)
    else:
        model, _ = load_model(spec.path, device=dev, dtype=spec.dtype, allow_pickle=spec.allow_pickle,
                              trust_remote_code=spec.trust_remote_code, with_tokenizer=False, gpus=spec.gpus)
        stack = InMemoryStack(model)
    stack.budget = budget
    stack.footprint = fp
    stack.max_streams = fp.max_streams(budget) if mode == "stream" else None
    if on_mode is not None:
        on_mode({"mode": mode, "budget": budget, "weights": fp.weights})
    return stack
