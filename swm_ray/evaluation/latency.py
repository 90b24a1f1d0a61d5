"""Generation latency, throughput and memory, as the paper measures them.

128 new tokens at batch 1, greedy, with `min_new_tokens == max_new_tokens` so every run generates the same
number of tokens; 10 warm-up runs are discarded and 20 are timed. Time to first token: as many runs again
that generate exactly one new token (the prompt's forward pass and the first sampled token), timed the same
way. CUDA events time GPU runs, `time.perf_counter` CPU runs. Memory: parameter bytes, plus peak CUDA memory
on GPU or the growth of the process RSS on CPU.
"""

from __future__ import annotations

import os
import statistics
import time

from swm_ray.errors import UserError

DEFAULT_PROMPT = "The history of the city begins"


def parameter_bytes(model) -> int:
    """Bytes held by the model's unique parameters and buffers."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def rss_bytes() -> int:
    """Current resident set size of this process."""
    try:
        import psutil

        return int(psutil.Process(os.getpid()).memory_info().rss)
    except ImportError:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _generate_kwargs(tok, new_tokens: int) -> dict:
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return dict(do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=pad, use_cache=True)


def _timed_generate(model, inputs: dict, kwargs: dict, cuda: bool) -> tuple[float, int]:
    """(seconds, new tokens) of one `generate` call."""
    import torch

    prompt_len = inputs["input_ids"].shape[1]
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = model.generate(**inputs, **kwargs)
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1000.0, out.shape[1] - prompt_len
    t0 = time.perf_counter()
    out = model.generate(**inputs, **kwargs)
    return time.perf_counter() - t0, out.shape[1] - prompt_len


def measure_latency(
    model,
    tok,
    *,
    new_tokens: int = 128,
    warmup: int = 10,
    runs: int = 20,
    batch_size: int = 1,
    prompt: str = DEFAULT_PROMPT,
) -> dict:
    """Time greedy generation of `new_tokens` tokens; mean/median/std latency, tokens/s, time to first token
    (`ttft_s`: the mean of `runs` generations of one token) and memory."""
    import torch

    if new_tokens < 1 or runs < 1 or warmup < 0 or batch_size < 1:
        raise UserError("latency needs new_tokens >= 1, runs >= 1, warmup >= 0 and batch_size >= 1")
    device = next(model.parameters()).device
    cuda = device.type == "cuda"
    inputs = tok([prompt] * batch_size, return_tensors="pt").to(device)
    kwargs = _generate_kwargs(tok, new_tokens)
    rss0 = rss_bytes()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    with torch.inference_mode():
        for _ in range(warmup):
            _timed_generate(model, inputs, kwargs, cuda)
        timed = [_timed_generate(model, inputs, kwargs, cuda) for _ in range(runs)]
        first = [_timed_generate(model, inputs, _generate_kwargs(tok, 1), cuda) for _ in range(runs)]
    return _summarise(model, timed, first, batch_size, new_tokens, warmup, device, cuda, rss0)


def _summarise(model, timed, first, batch_size, new_tokens, warmup, device, cuda, rss0) -> dict:
    import torch

    seconds = [s for s, _ in timed]
    if any(n != 1 for _, n in first):
        raise RuntimeError(f"generate produced {first[0][1]} tokens instead of 1 (time to first token)")
    generated = timed[0][1]
    if any(n != new_tokens for _, n in timed):
        raise RuntimeError(f"generate produced {generated} tokens instead of {new_tokens}")
    mean = statistics.fmean(seconds)
    out = {
        "device": str(device),
        "timer": "cuda_events" if cuda else "perf_counter",
        "batch_size": batch_size,
        "new_tokens": new_tokens,
        "warmup": warmup,
        "runs": len(seconds),
        "latency_s": mean,
        "latency_s_median": statistics.median(seconds),
        "latency_s_std": statistics.stdev(seconds) if len(seconds) > 1 else 0.0,
        "tokens_per_s": batch_size * new_tokens / mean,
        "ttft_s": statistics.fmean(s for s, _ in first),
        "param_bytes": parameter_bytes(model),
    }
    if cuda:
        out["peak_cuda_bytes"] = int(torch.cuda.max_memory_allocated(device))
    else:
        out["rss_delta_bytes"] = max(0, rss_bytes() - rss0)
    return out


def compare_latency(model_res: dict, baseline_res: dict) -> dict:
    """Ratios of a model to its baseline measured in the same run: speed-up > 1 means the model is faster;
    `ttft_ratio` (model / baseline time to first token, < 1: faster) when both have it."""
    ratios = {
        "speedup": baseline_res["latency_s"] / model_res["latency_s"],
        "throughput_ratio": model_res["tokens_per_s"] / baseline_res["tokens_per_s"],
        "param_bytes_ratio": model_res["param_bytes"] / baseline_res["param_bytes"],
    }
    if model_res.get("ttft_s") and baseline_res.get("ttft_s"):
        ratios["ttft_ratio"] = model_res["ttft_s"] / baseline_res["ttft_s"]
    key = "peak_cuda_bytes" if "peak_cuda_bytes" in model_res else None
    if key and baseline_res.get(key):
        ratios["peak_cuda_bytes_ratio"] = model_res[key] / baseline_res[key]
    return ratios
