"""The one validated config tree (pydantic only, no torch; YAML text read through `io/fs.py`).

Precedence: defaults < YAML file (`--config`) < CLI flags (each flag is a shortcut for a config path)
< `--set a.b=value`. Every model is frozen and rejects unknown keys.
"""

from __future__ import annotations

import copy
import re
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from swm_ray.errors import UserError

CRITERIA = ("output", "cka", "kl", "nll")
SEARCHES = ("best-first", "top-down")
MERGE_METHODS = ("reference", "paper", "mean", "consistent", "keep-first", "keep-last")
ATTENTION_RULES = ("global", "bottom")
METHODS = ("swm", "shortgpt", "sleb", "laco", "shortened-ppl", "replaceme", "auto", "flap", "taylor")  # planners
WIDTH_METHODS = ("flap", "taylor")  # width pruners (heads and MLP channels, `width.py`), not depth planners
BASELINES = ("shortgpt", "sleb", "laco", "shortened-ppl", "replaceme")
AUTO_METHODS = ("swm", *BASELINES)  # what `auto` may run
FIT_SAMPLES = 128  # rows of a compensation fit (BENCHMARKS.md: 10 rows overfit a 576×576 map, 128 do not)
AUTO_CANDIDATES = ("swm", "swm/consistent", "swm/keep-first", "shortgpt", "sleb", "replaceme", "replaceme+lstsq")
COMPENSATIONS = ("none", "lstsq", "scale")
COMPENSATION_INPUTS = ("compressed", "original")
HEAL_MODES = ("lora", "local")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
Criterion = Literal[CRITERIA]
Search = Literal[SEARCHES]
MergeMethod = Literal[MERGE_METHODS]

DEFAULT_MODEL = "builtin:smollm2-135m"
DEFAULT_DATA = "builtin:lambada"
PAPER_TASKS = ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")


def is_fit(comp: str) -> bool:
    """Whether COMP of an auto candidate PLANNER+COMP names a fit: lstsq, lstsq:RIDGE (RIDGE >= 0) or scale."""
    method, colon, ridge = comp.partition(":")
    if method not in COMPENSATIONS or method == "none" or (colon and method != "lstsq"):
        return False
    try:
        return not colon or float(ridge) >= 0
    except ValueError:
        return False


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ModelConfig(_Section):
    """The model to load and how."""

    source: str = Field(DEFAULT_MODEL, description="builtin:NAME, a local HF folder, a hub id, or s3://...")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto (float32 on the CPU, bfloat16 on a GPU), float32, bfloat16 or float16")
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    allow_pickle: bool = Field(False, description="allow loading pickle (.bin/.pt) weights")
    trust_remote_code: bool = Field(False, description="run the model repository's own code")
    revision: str | None = Field(None, description="hub revision (branch, tag or commit) of the model")
    stream: Literal["auto", "always", "never"] = Field(
        "auto", description="layer streaming: one decoder layer resident at a time, read lazily from the "
        "safetensors files (auto: when the model does not fit the memory budget)")
    max_memory: str | None = Field(
        None, description="memory budget of one actor (or of this process), e.g. 2GB or 512MiB; default: the "
        "free memory of its device(s) (a share of host RAM on the CPU)")

    @field_validator("max_memory")
    @classmethod
    def _max_memory(cls, v: str | None) -> str | None:
        from swm_ray.io.sizes import size_bytes

        if v is not None:
            size_bytes(v)  # its ValueError names the size and what is expected
        return v

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", v):
            raise ValueError(f"{v!r} is not a device: give auto, cpu, cuda or cuda:N")
        return v


class DataConfig(_Section):
    """Calibration text."""

    source: str = Field(DEFAULT_DATA, description="builtin:lambada | builtin:boolq-passages | file | s3://")
    samples: int = Field(10, ge=1, description="number of calibration sequences (the paper: 10)")
    seq_len: int = Field(128, ge=2, description="tokens per sequence (the paper: 128)")
    seed: int = Field(1234, description="seed of the calibration sampler")
    mode: Literal["crops", "packed"] = Field(
        "crops", description="crops: the paper's sampler; packed: concatenate the texts, then cut")
    bos: Literal["auto", "always", "never"] = Field(
        "auto", description="BOS before each sequence: auto (where the tokenizer or model family expects it), "
        "always or never")
    batch_size: int = Field(5, description="sequences per minibatch (>= 4 for unbiased HSIC)")
    text_column: str = Field("text", description="the text column of .parquet/.jsonl files")

    @field_validator("batch_size")
    @classmethod
    def _b(cls, v: int) -> int:
        if v < 4:
            raise ValueError("batch size must be at least 4 (unbiased HSIC divides by b(b-3))")
        return v


class StatsConfig(_Section):
    """Layer-similarity (CKA) statistics."""

    kernel: Literal["linear", "rbf"] = Field("linear", description="CKA kernel: linear or rbf")
    skip_first_tokens: int = Field(1, ge=0, description="positions left out of the features (attention sink)")


class RayConfig(_Section):
    """Ray: the actors holding model replicas, and the cluster to join."""

    actors: int | None = Field(None, ge=1, description="default: the cluster's GPUs / gpus_per_actor (at most one "
                               "per calibration row), else 1")
    address: str | None = Field(
        None, description="null: $RAY_ADDRESS when set, else an embedded local Ray; auto or ray://HOST:10001 to "
        "join a cluster")
    cpus_per_actor: float | None = Field(
        None, gt=0, description="CPUs reserved by each model-holding actor (default: on the embedded local Ray "
        "this machine's CPUs shared among the actors; on a cluster 1)")
    gpus_per_actor: int = Field(1, ge=1, description="GPUs owned by one actor where the cluster has GPUs; the "
                                "model is placed across them with accelerate's device map")
    placement_timeout_s: float = Field(300.0, gt=0, description="how long to wait for the cluster to place the "
                                       "actors before stopping with what is missing")
    call_timeout_s: float = Field(3600.0, gt=0, description="an actor call that makes no progress for this long "
                                  "is treated as stuck: the actor is killed, restarted and the call retried")
    max_restarts: int = Field(3, ge=0, description="times Ray restarts a dead actor (it reloads its model and "
                              "rebuilds its state; its lost calls are retried)")
    threads_per_actor: int | None = Field(
        None, description="torch threads inside an actor (default: the CPUs it reserves, at least 1)")


class SelectConfig(_Section):
    """Window selection: criterion, search and target (one of threshold, ratio, layers)."""

    method: Literal[METHODS] = Field(
        "auto", description="swm (sliding-window merging: criterion, search and merge below), auto (run the "
        "auto_candidates to the target and keep the plan with the lowest loss on held-out calibration rows), or a "
        "baseline: "
        "shortgpt (drop the layers of lowest Block Influence), sleb (remove blocks one at a time by calibration "
        "loss), laco (LaCo layer collapse: laco_layers merged with the paper formula, top-down, interval "
        "laco_interval, while the output cosine stays above T), shortened-ppl (Shortened-LLM's one-shot PPL "
        "ranking), replaceme (ReplaceMe: the block of consecutive layers whose input and output are closest in "
        "angle at the last token, removed, with lstsq compensation unless merge.compensate says otherwise); "
        "width pruners (--ratio only): flap (FLAP, training-free, bias-compensated) or taylor (first-order "
        "Taylor importance, LLM-Pruner style), which remove whole KV head groups and MLP channels, the same "
        "number in every layer")
    replaceme_tokens: Literal["last", "all"] = Field(
        "last", description="replaceme: the positions the angular distance is read at: last = the last token of "
        "each calibration row (as published); all = every position but the first (at most 128, evenly spaced), "
        "averaged per row (a steadier estimate on few rows; holds rows × positions × (layers+1) × hidden floats "
        "until the reference pass ends)")
    auto_replaceme_tokens: Literal["last", "all"] = Field(
        "all", description="auto: replaceme_tokens for auto's ReplaceMe candidates (all: on few calibration rows "
        "the last token's block moves with the draw; BENCHMARKS.md, 'ReplaceMe's block read over every token')")
    laco_layers: int = Field(4, ge=2, description="LaCo: layers merged into one per accepted window (C)")
    laco_interval: int = Field(2, ge=1, description="LaCo: layers to move down after an accepted window (I)")
    criterion: Criterion = Field(
        "output", description="how a candidate window is judged: output (cosine of the final hidden states), kl "
        "(next-token KL to the original), nll (the candidate's calibration loss) or cka (the CKA matrix only)")
    search: Search = Field(
        "best-first", description="best-first (each step commits the best adjacent merge anywhere) or top-down "
        "(the paper's loop)")
    threshold: float | None = Field(None, description="accept while cosine/CKA > T, or KL/NLL <= T")
    ratio: float | None = Field(None, gt=0, lt=1, description="fraction of all parameters to remove")
    layers: int | None = Field(None, ge=1, description="number of decoder layers to remove")
    paper_loop: bool = Field(
        True, description="top-down only: true = the authors' loop exactly (the last layer is never merged, "
        "whatever protect_last; a window pending at the bottom is dropped); false = the fixes (no no-op re-test, "
        "the pending window is committed, protect_last is honoured)")
    protect_last: bool = Field(True, description="never merge the last decoder layer away (the paper's rule; "
                               "sleb and shortened-ppl follow their own published rules instead, and sleb, an auto "
                               "candidate, may remove the last layer)")
    protected_layers: tuple[int, ...] = Field((), description="0-based original layers that are never merged away")
    max_steps: int = Field(10_000, ge=1, description="guard against an endless top-down loop (window tests)")
    auto_candidates: tuple[str, ...] = Field(
        AUTO_CANDIDATES, description="auto: the planners it runs, each a method (swm, shortgpt, sleb, laco, "
        "shortened-ppl, replaceme) or swm/MERGE for swm with another merge method (swm/keep-first); PLANNER+COMP "
        "(replaceme+lstsq: ReplaceMe as published, with its least-squares map) is that planner's finished plan "
        "fitted with the compensation COMP (lstsq, lstsq:RIDGE, scale), one more plan to choose from; a fitted plan is "
        "chosen only if it also holds on the task items' text (the fit gate: the held-out calibration rows favour a "
        "fit on the same text even where it loses on other text; BENCHMARKS.md, 'The fit gate')")
    auto_compensate: tuple[str, ...] = Field(
        ("none", "lstsq"), description="auto: every finished candidate plan is tried with each of these "
        "compensations: none, scale, lstsq, or lstsq:RIDGE (the ridge λ of that fit; plain lstsq uses merge.ridge). "
        "A fitted plan is chosen only if it passes the fit gate (a fit on the calibration text wins on held-out "
        "rows of that text but can lose on other text); [none] fits only the PLANNER+COMP candidates "
        "(BENCHMARKS.md, 'Every finished plan fitted')")
    auto_validation: int = Field(8, ge=2, description="auto: calibration rows drawn beyond data.samples and held "
                                 "out from every planner and fit; the plan with the lowest NLL on them wins")
    auto_validation_max: int = Field(32, ge=2, description="auto: held-out rows at most: a close call (candidates "
                                     "within auto_margin standard errors) is decided on further held-out rows up "
                                     "to this many")
    auto_task_items: int = Field(
        192, ge=0, description="auto: multiple-choice items (PIQA, HellaSwag, WinoGrande; from the held-out slice "
        "of their validation splits that no reported accuracy reads) that decide between candidates the held-out "
        "loss cannot tell apart, and whose text checks a fitted plan before it is chosen (the fit gate); 0 = the "
        "loss alone, no gate")
    auto_close_signal: Literal["accuracy", "text", "resolved"] = Field(
        "resolved", description="auto: what the task-style items decide a close call by, when the further "
        "held-out rows leave it close: resolved (the default) = the lowest held-out loss stands unless another "
        "close one is ahead of it on the items by more than auto_margin standard errors, paired: on their text "
        "first, then on accuracy (BENCHMARKS.md, 'A close call the task items decide only where they resolve "
        "it'); accuracy = the most accurate, a tie to the lower loss (the default before); text = the lowest loss "
        "on the items' text (the correct continuation per byte), unless another close one is more accurate by more "
        "than auto_margin standard errors (it failed its check on an unseen seed, BENCHMARKS.md, 'A close call "
        "decided by the task items' text')")
    auto_gate_items: int = Field(
        576, ge=0, description="auto: task-style items the fit gate reads in all when its verdict is near its margin "
        "(auto_gate_band): the pair is scored on this many minus auto_task_items further items of the same held-out "
        "slices and judged on all of them; at most auto_task_items: never")
    auto_gate_band: float = Field(
        1.0, ge=0, description="auto: standard errors on either side of the fit gate's margin within which its "
        "verdict on auto_task_items is read again on auto_gate_items (0: never; BENCHMARKS.md, 'The fit gate near "
        "its margin')")
    auto_margin: float = Field(2.0, gt=0, description="auto: standard errors of the paired per-row difference in "
                               "held-out loss that count as resolved between finished plans: finalists within it "
                               "of the best are a close call; the fit gate sets aside a fitted plan behind by "
                               "more than this many on the task items' text")
    auto_stop_margin: float | None = Field(
        3.5, gt=0, description="auto: standard errors behind its best rival at which the race stops a search "
        "(null: auto_margin). A search behind early can finish ahead (BENCHMARKS.md, the 25% point, 3.2 standard "
        "errors behind at 4 of 9 layers); 3.5 keeps the plan chosen without stopping on every replayed run "
        "(BENCHMARKS.md, 'Stopping rules replayed'); a large value (1e9) runs every search to the end, at the "
        "cost of running them all")
    auto_stop_rule: Literal["partial", "finals", "half", "same", "merge"] = Field(
        "partial", description="auto: what a search's partial plan (k layers removed) is measured against before "
        "the race stops it: partial = finished plans removing >= k layers and the other searches' and rankings' "
        "plans at >= k layers; same = partial plans at exactly k only; half = finished plans, and partial plans "
        "once the search has done half of its steps; merge = finished plans, and the partial plans of the "
        "same search with another merge method (swm against swm/keep-first); finals = finished plans only "
        "(benchmarks/stop_rules.py replays each on a run without stopping)")
    compensate_aware: bool = Field(
        False, description="swm: score every candidate after its compensation (merge.compensate lstsq or scale): "
        "the candidate plan fitted bottom-up on the calibration rows, then the calibration NLL of that compensated "
        "model (lower is better; it replaces the criterion, and a threshold is an NLL). One fit and one NLL pass "
        "per candidate check")
    then_width: float | None = Field(
        None, gt=0, lt=1, description="after the depth plan, prune width (heads and MLP channels, uniform over the "
        "layers) of the merged model until this further fraction of the ORIGINAL model's parameters is removed "
        "(--ratio 0.1 with then_width 0.1: about 20% in all); null = depth only. --method flap|taylor prune width "
        "alone to --ratio")
    width_method: Literal[WIDTH_METHODS] = Field(
        "flap", description="the width pruner of then_width: flap (fluctuation of o_proj/down_proj inputs × weight "
        "column norms, with bias compensation) or taylor (|Σ w·∂L/∂w| per head group and channel; the whole model "
        "in memory in one process)")
    width_bias: bool | None = Field(
        None, description="FLAP's bias compensation: null = where the architecture can hold the bias (Llama: "
        "attention and MLP; Qwen3, Gemma 2/3: attention), true = required (refused where it cannot be stored), "
        "false = none")

    @field_validator("protected_layers")
    @classmethod
    def _protected(cls, v: tuple) -> tuple:
        if any(i < 0 for i in v):
            raise ValueError(f"protected layers are 0-based indices of the original model's layers, >= 0 (got "
                             f"{list(v)})")
        return v

    @field_validator("auto_candidates", "auto_compensate")
    @classmethod
    def _auto(cls, v: tuple, info: ValidationInfo) -> tuple:
        if not v:
            raise ValueError("auto needs at least one entry")
        if len(set(v)) != len(v):
            raise ValueError("entries repeat")
        if info.field_name == "auto_compensate":
            for spec in v:
                if spec != "none" and not is_fit(str(spec)):
                    raise ValueError(f"{spec!r} is not a compensation: use none, scale, lstsq or lstsq:RIDGE "
                                     f"(RIDGE >= 0)")
            return v
        for spec in v:
            planner, plus, fit = str(spec).partition("+")  # PLANNER+COMP: a candidate with its own fit
            if plus and not is_fit(fit):
                raise ValueError(f"auto candidate {spec!r}: after '+' comes a compensation: lstsq, lstsq:RIDGE "
                                 f"(RIDGE >= 0) or scale")
            method, _, merge = planner.partition("/")
            if plus and method not in AUTO_METHODS:
                raise ValueError(f"auto candidate {spec!r}: {method!r} is not a method auto can run; choose "
                                 f"among {', '.join(AUTO_METHODS)} (swm may name a merge: swm/keep-first)")
            if method not in AUTO_METHODS or (merge and (method != "swm" or merge not in MERGE_METHODS)):
                raise ValueError(f"{spec!r} is not a candidate: use a method of {', '.join(AUTO_METHODS)} or "
                                 f"swm/MERGE with MERGE in {', '.join(MERGE_METHODS)}; a compensation goes in "
                                 f"select.auto_compensate, or after the planner: PLANNER+COMP, e.g. replaceme+lstsq")
        return v

    @model_validator(mode="after")
    def _one_target(self) -> SelectConfig:
        if self.auto_validation_max < self.auto_validation:
            raise ValueError(f"auto_validation_max ({self.auto_validation_max}) must be at least auto_validation "
                             f"({self.auto_validation})")
        given = [n for n in ("threshold", "ratio", "layers") if getattr(self, n) is not None]
        if len(given) > 1:
            raise ValueError(f"give only one of threshold, ratio, layers (got {', '.join(given)})")
        return self


class MergeConfig(_Section):
    """How a window of layers becomes one layer."""

    method: MergeMethod = Field(
        "reference", description="reference (what produced the published numbers), paper (the formula as "
        "printed), consistent (as reference, with the norms that scale a weight's output taken with that "
        "weight), mean, keep-first or keep-last")
    attention: Literal[ATTENTION_RULES] = Field(
        "global", description="attention type (sliding/full, and its RoPE) of a merged window on hybrid models: "
        "global = full attention when the window contains a full-attention layer; bottom = the bottom layer's "
        "type, as the authors' code does")
    compensate: Literal[COMPENSATIONS] | None = Field(
        None, description="a correction fitted on calibration and folded into each merged window's (or kept "
        "layer's) MLP output: none, lstsq (ReplaceMe's least-squares map T, folded into down_proj; diagonal on "
        "Gemma 2/3, folded into post_feedforward_layernorm), scale (one least-squares factor); null = the method's "
        "own (lstsq for replaceme, none otherwise)")
    ridge: float = Field(0.0, ge=0, description="ridge λ of the fit: T = (MᵀM + λ'·I)⁻¹ (MᵀB + λ'·P), "
                         "λ' = λ·tr(MᵀM)/d, P the ridge_prior")
    ridge_prior: Literal["identity", "zero"] = Field(
        "identity", description="what the ridge pulls the map towards: identity (P = I: the uncompensated layer; "
        "a large λ gives back the model without compensation) or zero (P = 0, the textbook ridge: it also "
        "shrinks the MLP output)")
    compensate_input: Literal[COMPENSATION_INPUTS] = Field(
        "compressed", description="the input a window's fit sees: compressed (the compressed model's own, windows "
        "below merged and compensated: fitted bottom-up) or original (the original's: local fits)")
    skip_first: int = Field(1, ge=0, description="positions at the start of every row left out of the fit "
                            "(the attention sink)")
    fit_samples: int | None = Field(
        FIT_SAMPLES, ge=1, description="calibration rows the compensation fit sums over: the planners' "
        "data.samples rows plus further rows drawn after them (never auto's held-out rows). A d×d map from the "
        "planners' few rows overfits them; the sums are one forward pass per window, so more rows are cheap. "
        "Null or at most data.samples = the planners' rows only")


class EvalConfig(_Section):
    """Evaluation (`eval`, `compress --eval`, grid trials): zero-shot tasks, perplexity, latency."""

    tasks: tuple[str, ...] = Field(PAPER_TASKS, description="zero-shot tasks (lm-eval); [] for none")
    limit: int | None = Field(None, description="items per task (quick runs; PIQA, HellaSwag and WinoGrande never "
                              "past item 1000, where auto's held-out slice begins)")
    batch_size: int = Field(16, ge=1, description="lm-eval batch size")
    ppl_data: str | None = Field("builtin:boolq-passages", description="perplexity text: builtin:boolq-passages, "
                                 "wikitext2 or ptb (hub), a .parquet/.jsonl/.txt file; null for none")
    ppl_chunk: int = Field(128, ge=2, description="tokens per perplexity chunk")
    ppl_max_tokens: int | None = Field(16384, ge=1, description="perplexity tokens used at most (null: all)")
    ppl_bos: Literal["stream", "chunk", "none"] = Field(
        "stream", description="BOS for perplexity: stream (once), chunk (every chunk) or none")
    ppl_batch_size: int = Field(8, ge=1, description="perplexity chunks per forward")
    latency: bool = Field(False, description="also time greedy generation at batch 1")
    latency_runs: int = Field(20, ge=1, description="timed latency runs")
    latency_warmup: int = Field(10, ge=0, description="discarded warm-up runs")
    latency_new_tokens: int = Field(128, ge=1, description="generated tokens per latency run")
    offline: bool | None = Field(
        None, description="zero-shot task definitions: null or true = the packaged offline ones (the default; "
        "validation splits); false = lm-eval's standard tasks from the hub (ARC, OpenBookQA: test splits)")
    baseline: str | None = Field(None, description="`eval`: a second model evaluated and compared")
    enabled: bool = Field(False, description="`compress --eval`: evaluate the result into its model card")

    @field_validator("limit")
    @classmethod
    def _limit(cls, v: int | None) -> int | None:
        if v is not None and v < 1:
            raise ValueError("limit must be at least 1")
        return v

    @field_validator("tasks")
    @classmethod
    def _tasks(cls, v: tuple) -> tuple:
        """Unknown task names are refused when the config is read, not after a compress or a grid's trials (the
        tasks swm-ray scores are the paper's, `evaluation.zeroshot.TASKS`)."""
        names = [str(t).strip().lower() for t in v if str(t).strip()]
        unknown = [t for t in names if t not in PAPER_TASKS] if names != ["none"] else []
        if unknown:
            raise ValueError(f"unknown task(s) {', '.join(unknown)}: valid names are {', '.join(PAPER_TASKS)} ([] "
                             f"or none for no tasks)")
        return v




class GridConfig(_Section):
    """`swm-ray grid`: every combination of model × criterion × search × merge method, each taken to every
    target (layer counts, parameter ratios or thresholds), next to baseline pruners and the original model.
    The other sections (data, eval, select.paper_loop, ...) apply to every trial."""

    models: tuple[str, ...] = Field((), description="models of the grid (default: model.source)")
    criteria: tuple[Criterion, ...] = Field(("output",), description="criteria of the merging trials; [] for none")
    searches: tuple[Search, ...] = Field(("best-first",), description="searches of the merging trials")
    merges: tuple[MergeMethod, ...] = Field(("reference",), description="merge methods of the merging trials")
    layers: tuple[int, ...] = Field((), description="layer counts to remove (give one kind of target)")
    ratios: tuple[float, ...] = Field((), description="fractions of all parameters to remove")
    thresholds: tuple[float, ...] = Field((), description="thresholds (valid for every criterion)")
    baselines: tuple[Literal[(*BASELINES, "auto", *WIDTH_METHODS)], ...] = Field(
        ("shortgpt",), description="baseline pruners: shortgpt, sleb, laco, shortened-ppl, replaceme, auto (the "
        "plan of lowest held-out loss among select.auto_candidates), and the width pruners flap and taylor (whole "
        "KV groups and MLP channels removed to each of grid.ratios, ratios only); [] for none")
    then_width: tuple[float, ...] = Field(
        (), description="width after depth: every depth row (merging trials, depth baselines, auto) is also "
        "evaluated with the width of its merged model pruned by select.width_method until each of these further "
        "fractions of the ORIGINAL model's parameters is removed, one row each (uncompensated plans only, never "
        "healed); [] = depth only")
    compensate: tuple[Literal[COMPENSATIONS], ...] = Field(
        (), description="compensations every trial's plans are evaluated with (none, lstsq, scale), one row each; "
        "[] = each method's own (merge.compensate, else lstsq for replaceme and none for the others)")
    heal: tuple[Literal[("none", *HEAL_MODES)], ...] = Field(
        (), description="healing every compressed model is also evaluated with (none, local, lora), one row each, "
        "trained in the trial's process with the heal section's settings (local against the original model, "
        "lora as one worker) and needing the model in memory; [] = none only (no healing). The original model's "
        "row is never healed")
    concurrency: int | None = Field(None, ge=1, description="trials at once (default: as resources allow)")
    cpus_per_trial: float = Field(1.0, gt=0, description="CPUs (and torch threads) per trial")
    gpus_per_trial: float | None = Field(None, ge=0, description="default: 1 when the cluster has GPUs, else 0")
    tune_storage: str | None = Field(None, description="where Tune keeps its experiment (default: this machine's "
                                     "cache, CACHE/grids/NAME, with rows.jsonl and grid.json, so that --resume can "
                                     "finish it; give s3://... when trials run on several nodes: no --resume then)")

    @model_validator(mode="after")
    def _targets(self) -> GridConfig:
        given = [n for n in ("layers", "ratios", "thresholds") if getattr(self, n)]
        if len(given) > 1:
            raise ValueError(f"give only one kind of target: layers, ratios or thresholds (got {', '.join(given)})")
        if any(n < 1 for n in self.layers):
            raise ValueError("layer counts must be at least 1")
        if any(not 0 < r < 1 for r in self.ratios):
            raise ValueError("ratios must lie in (0, 1)")
        if any(not 0 < w < 1 for w in self.then_width):
            raise ValueError("then_width fractions must lie in (0, 1)")
        return self

    def target_kind(self) -> str | None:
        return next((n for n in ("layers", "ratios", "thresholds") if getattr(self, n)), None)

    def targets(self) -> tuple:
        kind = self.target_kind()
        return getattr(self, kind) if kind else ()


class HealConfig(_Section):
    """`swm-ray heal` (and `compress --heal`): recovery training of a compressed model. lora: LoRA adapters on
    q, k, v, o, gate, up, down trained with Ray Train and merged into the weights (the paper's recipe as
    defaults); local: each merged layer refit alone to the original window's output (MSE on hidden states)."""

    mode: Literal[HEAL_MODES] = Field("lora", description="lora (LoRA on the whole model, Ray Train workers) or "
                                      "local (refit each merged layer of plan.json to its original window)")
    after_compress: Literal[HEAL_MODES] | None = Field(
        None, description="`compress --heal`: heal the compressed folder in this mode before evaluating it")
    data: str | None = Field(None, description="training text: instruction records (instruction/input/output) "
                             "or plain text, .parquet/.jsonl/.json/.txt, local or s3://, or builtin: text "
                             "(default: data.source)")
    source: str | None = Field(None, description="local: the original model the windows are fitted to (default: "
                               "plan.json's source_model)")
    steps: int | None = Field(None, ge=1, description="optimizer steps: lora in total (default: from epochs), "
                              "local per merged layer (default 400)")
    epochs: float = Field(2.0, gt=0, description="lora: passes over the training examples (when steps is null)")
    lr: float | None = Field(None, gt=0, description="learning rate (default: lora 1e-4, local 3e-4)")
    batch_size: int = Field(64, ge=1, description="lora: examples per optimizer step over all workers (effective "
                            "batch; gradient accumulation makes up the rest)")
    micro_batch_size: int = Field(4, ge=1, description="examples per forward pass of one worker (lora), or "
                                  "calibration rows per Adam step (local)")
    cutoff: int = Field(256, ge=8, description="lora: tokens per example at most (longer ones are cut)")
    warmup_steps: int = Field(100, ge=0, description="lora: linear warm-up steps (then linear decay to 0)")
    lora_r: int = Field(8, ge=1, description="LoRA rank")
    lora_alpha: float = Field(16.0, gt=0, description="LoRA alpha (the update is scaled by alpha / r)")
    lora_dropout: float = Field(0.05, ge=0, lt=1, description="dropout on the LoRA input")
    target_modules: tuple[str, ...] = Field(LORA_TARGETS, min_length=1, description="linear layers that get "
                                            "adapters (at least one)")
    max_examples: int | None = Field(None, ge=1, description="lora: use at most this many training examples")
    workers: int | None = Field(None, ge=1, description="lora: Ray Train workers (data parallel; default: one per "
                                "GPU of the cluster, else 1)")
    cpus_per_worker: float | None = Field(None, gt=0, description="CPUs per Ray Train worker (default: on the "
                                          "embedded local Ray its CPUs shared among the workers; on a cluster 1)")
    checkpoint_every: int = Field(50, ge=1, description="lora: steps between checkpoints")
    checkpoints: str | None = Field(None, description="lora: where Ray Train keeps checkpoints, local or s3:// "
                                    "(default: beside out, .<name>.heal/); --resume continues from the last")
    keep_adapter: bool = Field(False, description="lora: also save the adapter alone (OUT/adapter/)")
    log_every: int = Field(10, ge=1, description="steps between progress lines (loss, tokens/s)")
    seed: int = Field(1234, description="seed of data order, adapter init and calibration sampling")
    local_samples: int = Field(512, ge=1, description="local: calibration sequences (at 400 steps × 4 rows, about "
                               "3 passes over 512; fewer rows let a large layer learn them by heart)")
    local_seq_len: int = Field(128, ge=2, description="local: tokens per calibration sequence")
    local_target: Literal["original", "window"] = Field(
        "original", description="local: what a merged layer learns to output: original = the original model's "
        "hidden state after the window (its own path from the embeddings, so drift from below is corrected too); "
        "window = the original window's layers run on the same input")
    skip_first_tokens: int = Field(1, ge=0, description="local: positions left out of the MSE (attention sink)")
    local_layers: Literal["merged", "above"] = Field(
        "merged", description="local: which layers are refit: merged = each merged layer alone; above = also every "
        "layer above the lowest merged one, each to the original model's hidden state after its original layer "
        "(with local_target original; the drift a merge leaves is corrected by the layers above it too; about one "
        "merged layer's fit per layer)")

    @model_validator(mode="after")
    def _above_needs_original(self) -> HealConfig:
        if self.local_layers == "above" and self.local_target != "original":
            raise ValueError("local_layers above refits the unmerged layers to the original model's hidden states: "
                             "set heal.local_target original")
        return self


class RunConfig(_Section):
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    stats: StatsConfig = StatsConfig()
    ray: RayConfig = RayConfig()
    select: SelectConfig = SelectConfig()
    merge: MergeConfig = MergeConfig()
    eval: EvalConfig = EvalConfig()
    grid: GridConfig = GridConfig()
    heal: HealConfig = HealConfig()
    out: str | None = Field(None, description="output: a folder for analyze/compress/grid/heal, eval.json (or a "
                            "folder) for eval; local or s3://")
    overwrite: bool = Field(False, description="replace an earlier swm-ray output at out")
    resume: bool = Field(False, description="continue an interrupted analyze/compress/heal of the same output "
                         "from the state (heal: the checkpoints) it left beside it")

    @field_validator("out")
    @classmethod
    def _out(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("the output path is empty: give a folder, or omit --out for the command's default")
        return v


def _set_path(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        nxt = node.setdefault(k, {})
        if not isinstance(nxt, dict):
            raise UserError(f"config key {dotted!r}: {k!r} is not a section")
        node = nxt
    node[keys[-1]] = value


def parse_set(items: list[str] | None) -> dict[str, Any]:
    """`["a.b=1", "c=x"]` -> {"a.b": 1, "c": "x"}; values are parsed as YAML scalars/lists."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--set {item!r}: expected KEY=VALUE, e.g. --set data.samples=32")
        try:
            out[key.strip()] = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            out[key.strip()] = raw
    return out


def load_yaml_text(path: str) -> tuple[str, dict]:
    """Read a YAML config file (local or s3://); returns (raw text, mapping)."""
    from swm_ray.io import fs as storage

    try:
        raw = storage.read_bytes(path).decode("utf-8")
    except UnicodeDecodeError:
        raise UserError(f"config file {path} is not UTF-8 text (saved as UTF-16 or binary?): save it as UTF-8 "
                        f"YAML") from None
    try:
        data = yaml.safe_load(raw) or {}
    except yaml.YAMLError as e:
        raise UserError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping of sections (model:, data:, ...)")
    return raw, data


def build_config(
    yaml_data: dict | None = None,
    flags: dict[str, Any] | None = None,
    sets: dict[str, Any] | None = None,
) -> RunConfig:
    """Merge defaults < YAML < flags (dotted paths, None = not given) < --set, and validate."""
    tree: dict = copy.deepcopy(yaml_data or {})
    for dotted, value in (flags or {}).items():
        if value is not None:
            _set_path(tree, dotted, value)
    for dotted, value in (sets or {}).items():
        _set_path(tree, dotted, value)
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "config"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key (`swm-ray config` lists the valid keys with their help)"
        elif err["type"] in ("tuple_type", "list_type"):
            msg += f" (write a list, e.g. {where}=[{err.get('input')}] with --set, or [a, b] in YAML)"
        raise UserError(f"config {where}: {msg}") from None


def dump_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
