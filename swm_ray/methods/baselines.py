"""Baseline pruners expressed as plans (so they run through the same merge/writer path).

ShortGPT: Block Influence BI_l = 1 − mean over tokens of cos(input of layer l, output of layer l); drop the
n layers with the lowest BI. A run of dropped layers [i..j] becomes the window [i−1, j] with `keep-first`
(the kept layer i−1 stands for it), so the plan is a drop-only plan like any other.

ReplaceMe's block choice (`replaceme_windows`): the n consecutive layers whose input and output hidden states
are closest in angle at the last token, from additive per-minibatch sums (`angular_distance_sums`).

LaCo (`laco`) and Shortened-LLM's PPL criterion (`shortened_ppl`) are pure planners over an `Evaluator`
(`selection.py`): they never load a model, so the same code runs on in-process scorers or on Ray actors, and
they return a `Selection` like the SWM searches do.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from swm_ray.compute.stack import LayerStack
from swm_ray.edits.windows import Group
from swm_ray.errors import UserError
from swm_ray.methods.selection import Evaluator, Selection, collapse, initial_groups, passes


@torch.inference_mode()
def block_influence_sums(stack: LayerStack, input_ids: np.ndarray, batches: Sequence[tuple[int, int]]) -> np.ndarray:
    """(B, L): per minibatch, the sums over its tokens of 1 − cos(layer input, layer output), layer-major.
    Additive: the driver adds shards' minibatches in minibatch order, as `block_influence` does."""
    pros = [stack.prologue(torch.tensor(input_ids[a:b])) for a, b in batches]
    hidden = [p.hidden for p in pros]
    sums = np.zeros((len(batches), stack.num_layers))
    for i in range(stack.num_layers):
        with stack.layer(i) as layer:
            for k, p in enumerate(pros):
                out = stack.run(layer, hidden[k], p.kwargs[i])
                cos = F.cosine_similarity(hidden[k].float(), out.float(), dim=-1)
                sums[k, i] = float((1 - cos).double().sum())
                hidden[k] = out
    return sums


def mean_of_sums(per_batch: Sequence[np.ndarray], count: int) -> np.ndarray:
    """Per-minibatch sums added in minibatch order (so the result does not depend on how many actors ran),
    divided by what they were summed over (tokens for Block Influence, rows for angular distances)."""
    total = np.zeros_like(per_batch[0])
    for part in per_batch:
        total += part
    return total / max(count, 1)


influence_from_sums = mean_of_sums  # (L,) mean Block Influence over tokens
angular_from_sums = mean_of_sums  # (L+1, L+1) mean angular distance over rows


def block_influence(stack: LayerStack, input_ids: np.ndarray, batches: Sequence[tuple[int, int]]) -> np.ndarray:
    """(L,) mean per-token 1 − cos(layer input, layer output) over the given minibatches."""
    tokens = sum((b - a) * input_ids.shape[1] for a, b in batches)
    return influence_from_sums(list(block_influence_sums(stack, input_ids, batches)), tokens)


@torch.inference_mode()
def angular_distance_sums(stack: LayerStack, input_ids: np.ndarray,
                          batches: Sequence[tuple[int, int]]) -> np.ndarray:
    """(B, L+1, L+1): per minibatch, the sums over its rows of the angular distance arccos(cos)/π between the
    hidden states i and j at the last token (0 = what enters layer 0, i = what layer i−1 returns, before the
    final norm). Additive: the driver adds shards' minibatches in minibatch order."""
    pros = [stack.prologue(torch.tensor(np.asarray(input_ids[a:b]))) for a, b in batches]
    hidden = [p.hidden for p in pros]
    last = [[h[:, -1, :].double().cpu()] for h in hidden]
    for i in range(stack.num_layers):
        with stack.layer(i) as layer:
            for k, p in enumerate(pros):
                hidden[k] = stack.run(layer, hidden[k], p.kwargs[i])
                last[k].append(hidden[k][:, -1, :].double().cpu())
    out = np.zeros((len(batches), stack.num_layers + 1, stack.num_layers + 1))
    for k, states in enumerate(last):
        unit = F.normalize(torch.stack(states, dim=1), dim=-1)  # (b, L+1, d)
        cos = (unit @ unit.transpose(1, 2)).clamp(-1.0, 1.0)
        out[k] = (torch.arccos(cos) / np.pi).sum(0).numpy()
    return out


def angular_distances(stack: LayerStack, input_ids: np.ndarray, batches: Sequence[tuple[int, int]]) -> np.ndarray:
    rows = sum(b - a for a, b in batches)
    return angular_from_sums(list(angular_distance_sums(stack, input_ids, batches)), rows)


def replaceme_windows(dist: np.ndarray, n: int, protected: Sequence[int] = ()) -> tuple[list[tuple[int, int]], float]:
    """ReplaceMe's cut (arXiv 2505.02819): the n consecutive layers s..s+n−1 with the smallest angular distance
    between their input (state s) and output (state s+n), as the keep-first window [s−1, s+n−1] (layer s−1
    stays and carries the compensation); s ≥ 1, no protected layer removed; ties go to the lowest s.
    Returns ([window], distance)."""
    n_layers = dist.shape[0] - 1
    prot = set(protected)
    starts = [s for s in range(1, n_layers - n + 1) if not prot & set(range(s, s + n))]
    if not starts:
        raise UserError(f"ReplaceMe: no block of {n} consecutive layers can be removed from {n_layers} (layer 0 and "
                        f"protected layers {sorted(prot)} stay); ask for fewer layers")
    best = min(starts, key=lambda s: (dist[s, s + n], s))
    return [(best - 1, best + n - 1)], float(dist[best, best + n])


def drop_windows(dropped: Sequence[int]) -> list[tuple[int, int]]:
    """Dropped layer indices -> keep-first windows [i−1, j] per run [i..j], top window first."""
    dropped = sorted(set(dropped))
    if 0 in dropped:
        raise ValueError("layer 0 cannot be dropped by a keep-first plan")
    runs: list[list[int]] = []
    for i in dropped:
        if runs and runs[-1][-1] == i - 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return sorted(((r[0] - 1, r[-1]) for r in runs), reverse=True)


def shortgpt_windows(bi: np.ndarray, n: int, protected: Sequence[int] = ()) -> list[tuple[int, int]]:
    """Windows that drop the n lowest-BI layers (never layer 0 or a protected one)."""
    order = [int(i) for i in np.argsort(bi, kind="stable") if i != 0 and i not in set(protected)]
    return drop_windows(order[:n])


def laco(
    num_layers: int,
    ev: Evaluator,
    *,
    merge_layers: int,
    interval: int,
    threshold: float,
    lowest: int = 0,
    highest: int | None = None,
    protected: Sequence[int] = (),
    on_event: Callable[[str, Group, float | None], None] | None = None,
) -> Selection:
    """LaCo's layer collapse (Yang et al. 2024, arXiv 2402.11187, Algorithm 1) as a plan.

    Following Algorithm 1 as the authors' released notebook (yangyifei729/LaCo, laco_llama-13b.ipynb) runs it:
    - top-down: the base index l starts at H − C (`highest` H, `merge_layers` C) and only moves down;
    - a candidate collapses C consecutive layers of the CURRENT model, l..l+C−1, into one (the C−1 layers above
      l collapse into l, RDSC "merges rear layers into a prior layer"); the model is cumulative: every accepted
      merge stays in the model that later candidates start from;
    - accept when the criterion passes T (the paper: mean over calibration samples of the cosine between the
      original's and the candidate's last hidden states, `s > T`, strict, via `selection.passes`);
    - after an accept l moves down by I (`interval`), after a reject by 1; the loop ends when l < L (`lowest`);
    - with I < C a later window contains an earlier merged layer (the paper's I is the minimum distance between
      two merge bases, not a guarantee of disjoint windows).

    swm-ray's reading where the paper is vague or a plan cannot say it:
    - l indexes the current model (the released code indexes `model.layers` after deletions). Because l only
      moves down and every merge sits at or above its base, l is always below every earlier merge, so it is
      also the original index of the base; only the window's top can reach into merged groups. The candidate
      is therefore the original range (groups[l][0], groups[l+C−1][1]).
    - The window is cut at the current layer holding original layer H (the released code cuts it at the model's
      top, the same for the default H = the last layer); so, as there, the first window is H−C..H−1 and a later
      window may reach H itself.
    - How the window becomes one layer is the scorer's merge method (LaCo: `paper`, RDSC). A plan window is a
      range of original layers, so a window that contains an earlier merged window is merged from the original
      layers of the whole range; RDSC applied to the already merged layer gives different weights for `paper`
      (for `reference`, what the released code actually computes, the two agree). The absorbed window leaves
      `windows`; the absorbing one keeps its own score.
    - A window that would delete a protected original layer (anywhere above its base) is rejected unevaluated
      (trace event "skip") and l moves down by 1; a protected layer may be a window's base.
    - The released code's reset "if l ≥ |M*| then l = |M*| − 1 − C" cannot fire with I ≥ 1 (l only decreases
      and stays below the current top), so it has no counterpart here; C ≥ 2 and I ≥ 1 are required.

    Returns `windows` top window first, `scores` (the score that accepted each), `evaluations`, and `trace`
    events ("commit" | "fail" | "skip", window, score).
    """
    highest = num_layers - 1 if highest is None else highest
    _check_laco(num_layers, merge_layers, interval, lowest, highest)
    groups = initial_groups(num_layers)
    sel = Selection([], [], threshold=threshold)
    emit = on_event or (lambda *a: None)
    prot = set(protected)
    skipped = 0
    l = highest - merge_layers
    if l < lowest:
        sel.note = f"LaCo: no window of {merge_layers} layers fits between layers {lowest} and {highest}"
    while l >= lowest:
        window = _laco_window(groups, l, merge_layers, highest)
        if any(window[0] < p <= window[1] for p in prot):
            skipped += 1
            sel.trace.append(("skip", window, None))
            emit("skip", window, None)
            l -= 1
            continue
        score = ev.score(groups, [window])[0]
        sel.evaluations += 1
        if passes(score, threshold, ev.higher_is_better):
            sel.trace.append(("commit", window, score))
            emit("commit", window, score)
            ev.commit(groups, window)
            groups = collapse(groups, window)
            _add_window(sel, window, score)
            l -= interval
        else:
            sel.trace.append(("fail", window, score))
            emit("fail", window, score)
            l -= 1
    if skipped:
        sel.note = f"{skipped} LaCo window(s) skipped unevaluated: they would merge a protected layer away"
    return sel


def _check_laco(num_layers: int, merge_layers: int, interval: int, lowest: int, highest: int) -> None:
    if merge_layers < 2:
        raise UserError(f"LaCo merge_layers (C) = {merge_layers}: a window must collapse at least 2 layers")
    if interval < 1:
        raise UserError(f"LaCo interval (I) = {interval}: must be at least 1 (the loop must move down)")
    if not 0 <= lowest <= highest < num_layers:
        raise UserError(f"LaCo layer range {lowest}..{highest}: must satisfy 0 <= lowest <= highest < {num_layers}")


def _laco_window(groups: Sequence[Group], l: int, merge_layers: int, highest: int) -> Group:
    """Original range of current layers l..l+C−1, cut at the current layer that holds original layer `highest`."""
    top = next(p for p, g in enumerate(groups) if g[0] <= highest <= g[1])
    return groups[l][0], groups[min(l + merge_layers - 1, top)][1]


def _add_window(sel: Selection, window: Group, score: float) -> None:
    """Record an accepted window; earlier windows inside it are absorbed (the plan holds disjoint windows)."""
    kept = [i for i, w in enumerate(sel.windows) if not (window[0] <= w[0] and w[1] <= window[1])]
    sel.windows = [sel.windows[i] for i in kept] + [window]
    sel.scores = [sel.scores[i] for i in kept] + [score]
    order = sorted(range(len(sel.windows)), key=lambda i: -sel.windows[i][0])  # top window first
    sel.windows = [sel.windows[i] for i in order]
    sel.scores = [sel.scores[i] for i in order]


def shortened_ppl(
    num_layers: int,
    ev: Evaluator,
    n_remove: int,
    *,
    keep_first: int = 4,
    keep_last: int = 2,
    protected: Sequence[int] = (),
) -> Selection:
    """Shortened-LLM's one-shot PPL criterion (Kim et al. 2024, arXiv 2402.02834) as a keep-first plan.

    Following the paper and its released code (`anal_block_sensitivity_ppl.py`, `block_prune.py`): on the
    ORIGINAL model, remove each block alone and measure the calibration perplexity; rank the blocks once,
    lowest perplexity first (ties: lower index first, as Python's stable sort there); remove the first
    `n_remove` of the ranking at once, with no re-scoring. Blocks 0..keep_first−1 and the last `keep_last` are
    never removed: the released pruning script keeps blocks 0–3 and the last two for every criterion unless
    `--no_plus_heuristic` (the paper introduces the rule with its Taylor+ criterion).

    swm-ray's reading: the candidate "block i removed" is the window (i−1, i) under a `keep-first` scorer with
    criterion `nll` (the caller builds it); mean token NLL ranks exactly as perplexity = exp(mean NLL). Only
    eligible blocks are scored (the released code scores all and filters afterwards: same ranking). A
    higher-is-better evaluator ranks highest first. keep_first ≥ 1: layer 0 cannot be dropped by a keep-first
    plan. The evaluator is left on the original model (nothing is committed).

    Returns `windows` as `drop_windows` makes them (a run of removed blocks i..j is the window [i−1, j]), top
    first; `scores[k]` belongs to `windows[k]` (a plan's similarities are per window): the largest NLL among
    its blocks, i.e. the block that entered the removal set last. Every block's own NLL is in `trace`, in rank
    order: ("remove" | "keep", (i−1, i), nll).
    """
    if keep_first < 1 or keep_last < 0:
        raise UserError(f"keep_first={keep_first}, keep_last={keep_last}: keep_first must be at least 1 (layer 0 "
                        f"cannot be dropped by a keep-first plan) and keep_last at least 0")
    if n_remove < 0:
        raise UserError(f"Shortened-LLM PPL: cannot remove {n_remove} blocks")
    prot = set(protected)
    eligible = [i for i in range(keep_first, num_layers - keep_last) if i not in prot]
    if len(eligible) < n_remove:
        raise UserError(f"Shortened-LLM PPL: {n_remove} blocks asked, only {len(eligible)} of {num_layers} may be "
                        f"removed (blocks 0..{keep_first - 1}, the last {keep_last} and protected ones are kept)")
    sel = Selection([], [])
    if n_remove == 0:
        return sel
    cands = [(i - 1, i) for i in eligible]
    scores = ev.score(initial_groups(num_layers), cands)
    sel.evaluations = len(cands)
    sign = -1.0 if ev.higher_is_better else 1.0
    order = sorted(range(len(cands)), key=lambda k: (sign * scores[k], eligible[k]))
    removed = {eligible[k]: float(scores[k]) for k in order[:n_remove]}
    sel.trace = [("remove" if r < n_remove else "keep", cands[k], float(scores[k])) for r, k in enumerate(order)]
    sel.windows = drop_windows(list(removed))
    pick = max if not ev.higher_is_better else min  # the weakest block of each run
    sel.scores = [pick(removed[i] for i in range(lo + 1, hi + 1)) for lo, hi in sel.windows]
    return sel
