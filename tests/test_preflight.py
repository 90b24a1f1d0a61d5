"""Targets checked before anything loads (`preflight.check_targets`): every target that config.json and the
safetensors headers show to be out of reach is a one-line error before calibration, a model or an actor pool;
the reach it uses is what the planners reach; the grid checks every model × target before Tune; the CLI
answers in seconds."""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pytest

from swm_ray.config import build_config
from swm_ray.errors import UserError

# the tiny Llama: 6 layers, 88,480 parameters, 9,280 per layer; width keeps 1 of 2 KV groups and 1 of 64 channels
IMPOSSIBLE = [
    ({"select.method": "swm", "select.layers": 5}, "at most 4 can be removed"),
    ({"select.method": "swm", "select.ratio": 0.95}, "largest reachable"),
    ({"select.layers": 2, "select.then_width": 0.99},
     "--then-width 0.99: width pruning of the 4 decoder layers left after removing 2 of 6 can remove at most 0.350"),
    ({"select.method": "swm", "select.threshold": 0.9, "select.then_width": 0.6},
     "the 5 decoder layers left after the threshold's windows"),
    ({"select.method": "flap", "select.ratio": 0.6}, "--ratio 0.6: width pruning of the 6 decoder layers can remove "
                                                     "at most 0.525"),
    ({"select.method": "taylor", "select.ratio": 0.6}, "can remove at most 0.514"),
    ({"select.method": "shortened-ppl", "select.layers": 1}, "never removes blocks 0-3 and the last two"),
    ({"select.method": "replaceme", "select.layers": 3, "select.protected_layers": [2]},
     "replaceme can remove at most 2 of the 6 layers"),
    ({"select.method": "laco", "select.layers": 4}, "laco can remove at most 3 of the 6 layers"),
    ({"select.method": "swm", "select.search": "top-down", "select.layers": 4},
     "swm can remove at most 3 of the 6 layers \\(the authors' top-down loop"),
    ({"select.method": "swm", "select.layers": 3, "select.protected_layers": [2]}, "swm can remove at most 2"),
    ({"select.method": "shortgpt", "select.layers": 2, "select.protected_layers": [1, 2, 3]},
     "shortgpt can remove at most 1"),
    ({"select.method": "sleb", "select.layers": 3, "select.protected_layers": [1, 3]}, "sleb can remove at most 1"),
    ({"select.method": "swm", "select.threshold": 0.9, "select.protected_layers": [0, 1, 2, 3, 4]},
     "can remove no layer"),
    ({"select.layers": 4, "select.auto_candidates": ["shortened-ppl", "laco"]},
     "no candidate of select.auto_candidates can reach the target"),
]


def _cfg(model, data, out, **flags):
    return build_config(flags={"model.source": str(model), "data.source": str(data), "data.samples": 8,
                               "data.seq_len": 16, "data.batch_size": 4, "out": str(out), **flags})


@pytest.fixture
def nothing_loads(monkeypatch):
    """Calibration, tokenizer, model, layer stack and actor pool all refuse: a check that needs one comes too late."""
    import swm_ray.compute.stack
    import swm_ray.io.data
    import swm_ray.io.models
    import swm_ray.jobs.compress
    import swm_ray.jobs.pool

    def refuse(*args, **kwargs):
        raise AssertionError("something loaded before the targets were checked")

    for mod, name in ((swm_ray.io.models, "load_model"), (swm_ray.io.models, "load_tokenizer"),
                      (swm_ray.compute.stack, "open_stack"), (swm_ray.io.data, "calibration_for"),
                      (swm_ray.io.data, "calibration_sets"), (swm_ray.jobs.compress, "calibration_sets"),
                      (swm_ray.jobs.pool, "ActorPool")):
        monkeypatch.setattr(mod, name, refuse, raising=False)


@pytest.mark.parametrize("recipe", ["in-process", "ray"])
@pytest.mark.parametrize("flags, message", IMPOSSIBLE)
def test_impossible_targets_are_refused_before_anything_loads(tiny_llama_dir, tokens_parquet, tmp_path,
                                                             nothing_loads, recipe, flags, message):
    from swm_ray.jobs.compress import run_compress
    from swm_ray.recipes.pipeline import compress_here

    run = compress_here if recipe == "in-process" else run_compress
    with pytest.raises(UserError, match=message) as e:
        run(_cfg(tiny_llama_dir, tokens_parquet, tmp_path / "o", **flags))
    assert "\n" not in str(e.value) and not (tmp_path / "o").exists()


@pytest.mark.parametrize("flags, removed", [
    ({"select.layers": 4}, 4),  # auto: swm reaches 4, replaceme (at most 4 with protect_last) too
    ({"select.layers": 2, "select.auto_candidates": ["shortened-ppl", "swm"]}, 2),  # one candidate is enough
    ({"select.method": "replaceme", "select.layers": 2, "select.protected_layers": [2]}, 2),
    ({"select.method": "laco", "select.layers": 3}, 3),
    ({"select.method": "swm", "select.search": "top-down", "select.layers": 3}, 3),
    ({"select.method": "swm", "select.ratio": 0.2}, 2),
    ({"select.layers": 2, "select.then_width": 0.3}, 2),
    ({"select.method": "flap", "select.ratio": 0.5}, None),
    ({"select.method": "swm", "select.threshold": 0.9}, None),
    ({"select.method": "swm"}, None),  # no target: the recipe asks for one
])
def test_reachable_targets_pass(tiny_llama_dir, flags, removed):
    from swm_ray.recipes.preflight import check_targets

    assert check_targets(build_config(flags={"model.source": str(tiny_llama_dir), **flags})) == removed


class _Accept:
    """An evaluator that accepts every window (`bottom`: except those starting at layer 0, so the authors'
    top-down loop, which drops a window still growing at the bottom, commits the largest window it can)."""

    higher_is_better = True

    def __init__(self, bottom: bool = True):
        self.bottom = bottom

    def score(self, groups, candidates):
        return [0.0 if c[0] == 0 and not self.bottom else 1.0 for c in candidates]

    def commit(self, groups, window):
        pass


@pytest.mark.parametrize("n_layers", [6, 9])
@pytest.mark.parametrize("select", [
    {"method": "swm"}, {"method": "swm", "protected_layers": (2,)}, {"method": "swm", "protect_last": False},
    {"method": "swm", "search": "top-down"}, {"method": "swm", "search": "top-down", "paper_loop": False},
    {"method": "swm", "search": "top-down", "paper_loop": False, "protected_layers": (3,)},
    {"method": "sleb", "protected_layers": (1, 4)}, {"method": "shortgpt", "protected_layers": (3,)},
    {"method": "replaceme", "protected_layers": (3,)}, {"method": "replaceme", "protect_last": False},
    {"method": "laco"}, {"method": "laco", "laco_layers": 2, "laco_interval": 2},
    {"method": "laco", "laco_layers": 3, "laco_interval": 1},
])
def test_depth_reach_is_what_the_planners_reach(select, n_layers):
    """`depth_reach` against the planners themselves on a scripted evaluator: they remove exactly that many layers
    at most (LaCo: an upper bound, met where no window is cut or skipped at the top)."""
    from swm_ray.config import SelectConfig
    from swm_ray.methods.baselines import laco, replaceme_windows, shortgpt_windows
    from swm_ray.methods.selection import best_first, protected_set, top_down
    from swm_ray.recipes.preflight import depth_reach

    s = SelectConfig(**select)
    most, _ = depth_reach(s, n_layers)
    if s.method == "replaceme":
        dist = np.zeros((n_layers + 1, n_layers + 1))
        assert replaceme_windows(dist, most, protected_set(s, n_layers))
        with pytest.raises(UserError):
            replaceme_windows(dist, most + 1, protected_set(s, n_layers))
        return
    if s.method == "shortgpt":
        windows = shortgpt_windows(np.arange(n_layers, dtype=float), n_layers, protected_set(s, n_layers))
    elif s.method == "laco":
        windows = laco(n_layers, _Accept(), merge_layers=s.laco_layers, interval=s.laco_interval, threshold=0.5,
                       protected=protected_set(s, n_layers)).windows
    elif s.search == "top-down":
        paper = s.paper_loop
        windows = top_down(n_layers, 0.5, _Accept(bottom=not paper), paper_loop=paper, protect_last=s.protect_last,
                           protected=sorted(s.protected_layers) if paper else protected_set(s, n_layers)).windows
    else:
        windows = best_first(n_layers, _Accept(), threshold=0.5,
                             protected=sorted(s.protected_layers) if s.method == "sleb" else protected_set(s, n_layers)
                             ).windows
    removed = sum(h - lo for lo, h in windows)
    if s.method == "laco" and n_layers == 9:  # LaCo's is a bound: windows at the top are cut or skipped here
        assert removed <= most
    else:
        assert removed == most


def _grid(model, data, out, **sets):
    return build_config(flags={"model.source": str(model), "data.source": str(data), "out": str(out)},
                        sets={"grid.criteria": ["output"], "grid.baselines": [], **sets})


@pytest.mark.parametrize("sets, message", [
    ({"grid.layers": [1, 5]}, "grid --layers 5 on .*: no trial of the grid can reach it; the first said: --layers 5"),
    ({"grid.layers": [1], "grid.criteria": [], "grid.baselines": ["shortened-ppl"]}, "grid --layers 1 on"),
    ({"grid.layers": [1, 2], "grid.then_width": [0.2, 0.99]}, "grid --then-width 0.99 on .*: no depth row"),
    ({"grid.ratios": [0.6], "grid.criteria": [], "grid.baselines": ["flap"]}, "--ratio 0.6: width pruning"),
])
def test_grid_refuses_a_target_no_trial_reaches(tiny_llama_dir, tokens_parquet, tmp_path, sets, message):
    from swm_ray.recipes.preflight import check_grid_targets

    with pytest.raises(UserError, match=message) as e:
        check_grid_targets(_grid(tiny_llama_dir, tokens_parquet, tmp_path / "g", **sets))
    assert "\n" not in str(e.value)


def test_grid_keeps_targets_some_trial_reaches(tiny_llama_dir, tokens_parquet, tmp_path):
    """shortened-ppl cannot remove a layer of 6, swm can: the grid runs and shortened-ppl gives skipped rows."""
    from swm_ray.recipes.preflight import check_grid_targets

    check_grid_targets(_grid(tiny_llama_dir, tokens_parquet, tmp_path / "g", **{
        "grid.layers": [1, 4], "grid.baselines": ["shortened-ppl", "laco"], "grid.then_width": [0.3]}))


def test_run_grid_checks_before_calibration_and_tune(tiny_llama_dir, tokens_parquet, tmp_path, nothing_loads,
                                                     monkeypatch):
    import swm_ray.jobs.runtime
    from swm_ray.jobs.grid import run_grid

    monkeypatch.setattr(swm_ray.jobs.runtime, "init_ray", lambda *a, **k: pytest.fail("Ray started"))
    with pytest.raises(UserError, match="grid --layers 5"):
        run_grid(_grid(tiny_llama_dir, tokens_parquet, tmp_path / "g", **{"grid.layers": [5]}))
    assert not (tmp_path / "g").exists()


def test_cli_answers_an_impossible_width_at_once(tiny_llama_dir, tokens_parquet, tmp_path):
    """`swm-ray compress M --layers 2 --then-width 0.99`: one line, a non-zero exit, no search first."""
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", "from swm_ray.cli import main; main()", "compress",
                          str(tiny_llama_dir), "--data", str(tokens_parquet), "--layers", "2", "--then-width", "0.99",
                          "--out", str(tmp_path / "x")], capture_output=True, text=True, timeout=120)
    seconds = time.perf_counter() - t0
    lines = [ln for ln in (res.stdout + res.stderr).splitlines() if ln.strip()]
    assert res.returncode != 0 and len(lines) == 1, lines
    assert lines[0].startswith("error: --then-width 0.99: width pruning of the 4 decoder layers")
    assert seconds < 60 and not (tmp_path / "x").exists()  # imports only (a few seconds); before: no answer in 300 s
