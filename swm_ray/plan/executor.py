"""The executor: a plan applied to a source checkpoint, as a checkpoint whose tensors are computed on demand.

`PlanView` answers the same questions as `Checkpoint` (names, dtypes, shapes, `read`), for the EDITED
model: kept layers are the source's tensors under their new index, a merged window's tensors are computed
from that window's own layers with `merge.merge_tensor`, a compensated window's fit is folded into its
tensor when that tensor is read (`fold.fold`), a width entry slices the layers after that
(`edits.width.WidthEdit`: heads and channels kept, FLAP's biases), nothing else is touched. The streaming writer
writes a `PlanView` tensor by tensor; `StreamingStack` runs one layer at a time (the reload check, and
evaluating a candidate without writing it); `materialize` builds it in memory.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import torch

from swm_ray.edits.merge import check_method, edit_config, merge_tensor, selected_layer
from swm_ray.edits.windows import layer_types_of, new_layer_sources
from swm_ray.errors import UserError
from swm_ray.io.anatomy import text_config_of
from swm_ray.io.checkpoint import Checkpoint, TensorInfo, dtype_code


class PlanView:
    """The edited model's tensors (see the module docstring). `config` is the edited config (a copy)."""

    def __init__(self, ckpt: Checkpoint, source_config, windows: Sequence[Sequence[int]], method: str,
                 attention: str = "global", fits: Mapping | None = None, width: Mapping | None = None,
                 width_tensors: Mapping | None = None):
        """`fits`: {window: `fold.Fit`} folded into those windows' layers (a plan's compensation).
        `width`: a plan's width entry (indices of the layers after the windows), `width_tensors` its biases."""
        check_method(method)
        self.source = ckpt
        self.method = method
        tcfg = text_config_of(source_config)
        self.sources = new_layer_sources(ckpt.num_layers, windows, layer_types_of(tcfg), attention, method)
        self.config = copy.deepcopy(source_config)
        edit_config(text_config_of(self.config), self.sources)
        self.layer_prefix = ckpt.layer_prefix
        self.num_layers = len(self.sources)
        self.pickled = False
        self.infos: dict[str, TensorInfo] = {}
        self._origin: dict[str, tuple[int, str] | str] = {}  # new name -> (position, name in layer) or source key
        for key in ckpt.other_keys():
            self.infos[key] = ckpt.infos[key]
            self._origin[key] = key
        for pos, (low, _high, _anchor) in enumerate(self.sources):
            for rest, key in ckpt.layer_keys(low).items():
                name = f"{self.layer_prefix}.{pos}.{rest}"
                src = ckpt.infos[key]
                self.infos[name] = TensorInfo(name, src.file, src.dtype, src.shape)
                self._origin[name] = (pos, rest)
        self._folds: dict[str, tuple] = {}  # new name -> (fit, site)
        if fits:
            from swm_ray.edits.fold import fold_site

            site = fold_site(tcfg.model_type, ckpt.layer_keys(0))
            position = {(low, high): pos for pos, (low, high, _) in enumerate(self.sources)}
            for window, fit in fits.items():
                pos = position.get((int(window[0]), int(window[1])))
                if pos is None:
                    raise UserError(f"compensation of window {list(window)}: the plan has no such window")
                for rest in site.names:
                    self._folds[f"{self.layer_prefix}.{pos}.{rest}"] = (fit, site)
        self.width = None
        if width:
            self._apply_width(width, width_tensors or {})

    def _apply_width(self, width: Mapping, tensors: Mapping) -> None:
        """Shapes of the width-pruned tensors, the biases the edit adds, and the config's widths."""
        from swm_ray.edits.width import WidthEdit

        tcfg = text_config_of(self.config)
        self.width = WidthEdit(width, tensors, tcfg, self.num_layers, list(self.layer_keys(0)))
        for name, origin in list(self._origin.items()):
            if isinstance(origin, tuple):
                info = self.infos[name]
                self.infos[name] = TensorInfo(name, info.file, info.dtype, self.width.shape(*origin, info.shape))
        for pos in range(self.num_layers):
            ref = self.infos[f"{self.layer_prefix}.{pos}.{next(iter(self.layer_keys(pos)))}"]
            weight = self.layer_keys(pos).get("self_attn.o_proj.weight")
            dtype = self.infos[weight].dtype if weight else ref.dtype
            for rest, shape in self.width.added.items():
                name = f"{self.layer_prefix}.{pos}.{rest}"
                self.infos[name] = TensorInfo(name, ref.file, dtype, shape)
                self._origin[name] = (pos, rest)
        self.width.edit_config(tcfg)

    # -- the Checkpoint interface ---------------------------------------------------------------------------
    def layer_keys(self, i: int) -> dict[str, str]:
        head = f"{self.layer_prefix}.{i}."
        return {k[len(head):]: k for k in self.infos if k.startswith(head)}

    def layer_of(self, name: str) -> tuple[int, str] | None:
        origin = self._origin.get(name)
        return origin if isinstance(origin, tuple) else None

    def other_keys(self) -> list[str]:
        return [k for k, o in self._origin.items() if isinstance(o, str)]

    def nbytes(self, keys=None) -> int:
        return sum(self.infos[k].nbytes for k in (self.infos if keys is None else keys))

    def param_count(self, tied_embeddings: bool = False) -> int:
        return Checkpoint.param_count(self, tied_embeddings)  # type: ignore[arg-type]

    def layer_state(self, i: int, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        return {rest: self.read(key, dtype) for rest, key in self.layer_keys(i).items()}

    def source_of(self, name: str) -> str | None:
        """The source key whose stored bytes ARE the edited tensor `name` (a kept layer's tensor, or one a
        merge takes as it is), or None when the tensor is computed. A writer copies those bytes directly."""
        origin = self._origin[name]
        if isinstance(origin, str):
            return origin
        if name in self._folds:
            return None
        pos, rest = origin
        if self.width is not None and (rest in self.width.added or self.width.touches(rest)):
            return None
        low, high, _ = self.sources[pos]
        k = selected_layer(rest, high - low + 1, self.method, self.source.layer_keys(low))
        return None if k is None else self.source.layer_keys(low + k)[rest]

    def read(self, name: str, dtype: torch.dtype | None = None, hasher=None) -> torch.Tensor:
        """The edited model's tensor `name`; `hasher` sees every SOURCE tensor read for it."""
        origin = self._origin[name]
        if isinstance(origin, str):
            return self.source.read(origin, dtype, hasher)
        pos, rest = origin
        if self.width is not None and rest in self.width.added:
            return self.width.new_tensor(pos, rest, dtype or self.infos[name].torch_dtype)
        low, high, _ = self.sources[pos]

        def read(k: int) -> torch.Tensor:
            return self.source.read(self.source.layer_keys(low + k)[rest], hasher=hasher)

        t = merge_tensor(rest, read, high - low + 1, self.method, self.source.layer_keys(low))
        if name in self._folds:
            from swm_ray.edits.fold import fold

            t = fold(rest, t, *self._folds[name])
        if self.width is not None:
            t = self.width.slice(pos, rest, t)
        if dtype_code(t.dtype) != self.infos[name].dtype:
            raise RuntimeError(f"merged {name} came out as {t.dtype}, expected {self.infos[name].dtype}")
        return t.to(dtype) if dtype is not None and dtype != t.dtype else t


@torch.no_grad()
def materialize(view, config, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """A causal LM in memory holding every tensor of `view` (a Checkpoint, or a PlanView and its `.config`);
    peak memory is the model plus one tensor. Returns the model in eval mode."""
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    first = next(iter(view.infos.values()))
    dtype = dtype or first.torch_dtype
    with no_init_weights(), torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()  # under no_init_weights transformers 5 leaves a tied LM head untied (its own tensor)
    params = dict(model.named_parameters())
    missing = [n for n in params if n not in view.infos]
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is model.get_input_embeddings().weight
    missing = [n for n in missing if not (tied and n.endswith("lm_head.weight"))]
    if missing:
        raise RuntimeError(f"the edited model lacks tensors {missing[:3]}")
    for name, p in params.items():
        if name in view.infos:
            p.copy_(view.read(name, p.dtype))
    return model.eval()


def plan_model(plan_path, cache: dict | None = None, device: str | torch.device = "cpu",
               dtype: torch.dtype | None = torch.float32):
    """(model, tokenizer, Plan): a saved plan (its side tensors: fits, width biases) built in memory from its
    source checkpoint, without writing a folder. `cache` ((source, revision) -> (Checkpoint, config, tokenizer)) lets
    several plans of one source share the reads of its config and tokenizer; `source_model` builds the
    source itself from the same cache."""
    from swm_ray.edits.fold import plan_fits
    from swm_ray.plan.plan import Plan

    plan = Plan.load(plan_path)
    ckpt, config, tok = _cached_source(plan.source_model, plan.source_revision, cache)
    view = PlanView(ckpt, config, plan.windows, plan.merge, plan.attention, plan_fits(plan), width=plan.width,
                    width_tensors=plan.tensors)
    return materialize(view, view.config, device, dtype), tok, plan


def source_model(source: str, cache: dict | None = None, revision: str | None = None,
                 device: str | torch.device = "cpu", dtype: torch.dtype | None = torch.float32):
    """(model, tokenizer): the unedited source, read through the same cache as `plan_model`."""
    ckpt, config, tok = _cached_source(source, revision, cache)
    return materialize(ckpt, config, device, dtype), tok


def _cached_source(source: str, revision: str | None, cache: dict | None):
    from swm_ray.io.models import load_config, load_tokenizer, resolve_model_path

    cache = {} if cache is None else cache
    if (source, revision) not in cache:  # two revisions of one hub id are two sources
        path = resolve_model_path(source, revision)
        cache[(source, revision)] = (Checkpoint(path), load_config(path), load_tokenizer(path))
    return cache[(source, revision)]
