"""Perplexity in non-overlapping chunks over one token stream (the paper: WikiText-2 / PTB, 128-token chunks).

The texts are tokenized without special tokens and joined with a separator (`"\\n\\n"` or the EOS token)
into one stream, capped at `max_tokens`, and cut into full chunks (an incomplete tail is dropped). BOS:

- `"none"`: chunks are plain slices of the stream; the first token of each chunk is context only.
- `"stream"`: one BOS at the start of the stream, then the same slicing (the usual WikiText-2 protocol:
  the whole test set tokenized at once, which puts BOS in front, then cut).
- `"chunk"`: BOS in front of every chunk of `chunk` stream tokens; every stream token is a target,
  BOS never is.

NLL is the mean negative log-likelihood per target token, PPL its exponential.
"""

from __future__ import annotations

import math
from typing import Literal

from swm_ray.errors import UserError

BosMode = Literal["none", "stream", "chunk"]
BOS_MODES = ("none", "stream", "chunk")
HUB_SETS = {
    # name: (dataset id, config, split, text column, joiner of the rows into one text)
    "wikitext2": ("Salesforce/wikitext", "wikitext-2-raw-v1", "test", "text", "\n\n"),
    "ptb": ("ptb-text-only/ptb_text_only", "penn_treebank", "test", "sentence", " "),
}
_ENCODE_BATCH = 256


def separator_ids(tok, sep: str) -> list[int]:
    """Token ids placed between texts: `sep="eos"` gives [eos] (falls back to "\\n\\n"), else `sep` encoded."""
    if sep == "eos":
        if tok.eos_token_id is not None:
            return [int(tok.eos_token_id)]
        sep = "\n\n"
    return list(tok(sep, add_special_tokens=False)["input_ids"])


def bos_id(tok) -> int:
    """The BOS id (EOS for tokenizers without one, as GPT-2 style models use it); UserError if neither."""
    for tid in (tok.bos_token_id, tok.eos_token_id):
        if tid is not None:
            return int(tid)
    raise UserError("perplexity with a BOS token asked, but the tokenizer has neither BOS nor EOS: use bos=none")


def token_stream(tok, texts: list[str], *, max_tokens: int | None = None, sep: str = "\n\n") -> list[int]:
    """Tokenize `texts` (no special tokens) joined by `sep`, stopping once `max_tokens` are collected."""
    joiner = separator_ids(tok, sep)
    stream: list[int] = []
    for start in range(0, len(texts), _ENCODE_BATCH):
        batch = [t for t in texts[start : start + _ENCODE_BATCH] if t and t.strip()]
        if not batch:
            continue
        for ids in tok(batch, add_special_tokens=False)["input_ids"]:
            if stream:
                stream.extend(joiner)
            stream.extend(ids)
        if max_tokens is not None and len(stream) >= max_tokens:
            break
    return stream[:max_tokens] if max_tokens is not None else stream


def make_chunks(stream: list[int], chunk: int, bos: BosMode = "none", bos_token: int | None = None) -> list[list[int]]:
    """Cut the stream into equal chunks as the BOS mode says; every chunk is a model input (see module doc)."""
    if bos not in BOS_MODES:
        raise UserError(f"unknown bos mode {bos!r}: choose one of {', '.join(BOS_MODES)}")
    if chunk < 2:
        raise UserError(f"perplexity chunk must be at least 2 tokens (got {chunk})")
    if bos != "none" and bos_token is None:
        raise ValueError("bos_token is needed for bos='stream' or 'chunk'")
    if bos == "stream":
        stream = [bos_token, *stream]
    n = len(stream) // chunk
    chunks = [stream[i * chunk : (i + 1) * chunk] for i in range(n)]
    if bos == "chunk":
        chunks = [[bos_token, *c] for c in chunks]
    return chunks


def chunk_nll(model, chunks: list[list[int]], batch_size: int = 8) -> tuple[float, int]:
    """(summed NLL, number of target tokens) of next-token prediction inside each chunk, batched.

    `model` is a causal LM, or a `LayerStack` (`swm_ray.compute.stack`) for a model run one layer at a time."""
    import torch

    from swm_ray.compute.stack import LayerStack

    if isinstance(model, LayerStack):
        return _stack_nll(model, chunks, batch_size)
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(chunks), batch_size):
            ids = torch.tensor(chunks[start : start + batch_size], dtype=torch.long, device=device)
            t, c = _batch_nll(model(input_ids=ids, use_cache=False).logits, ids)
            total += t
            count += c
    return total, count


def _batch_nll(logits, ids) -> tuple[float, int]:
    import torch.nn.functional as F

    logits = logits[:, :-1].float()
    targets = ids[:, 1:].to(logits.device)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")
    return float(loss.double()), targets.numel()


def _stack_nll(stack, chunks: list[list[int]], batch_size: int, rows_per_pass: int = 64) -> tuple[float, int]:
    """`chunk_nll` layer by layer: `rows_per_pass` chunks walk up the stack together (one build of each
    layer per pass), in batches of `batch_size` exactly as the whole-model path runs them."""
    import torch

    per_pass = max(batch_size, rows_per_pass // batch_size * batch_size)
    total, count = 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(chunks), per_pass):
            part = chunks[start : start + per_pass]
            ids = [torch.tensor(part[b : b + batch_size], dtype=torch.long) for b in range(0, len(part), batch_size)]
            pros = [stack.prologue(x) for x in ids]
            hidden = [p.hidden for p in pros]
            for i in range(stack.num_layers):
                with stack.layer(i) as layer:
                    hidden = [stack.run(layer, h, p.kwargs[i]) for h, p in zip(hidden, pros)]
            for h, x in zip(hidden, ids):
                t, c = _batch_nll(stack.logits(stack.final(h)), x)
                total += t
                count += c
    return total, count


def perplexity(
    model,
    tok,
    texts: list[str],
    chunk: int = 128,
    max_tokens: int | None = None,
    bos: BosMode = "none",
    batch_size: int = 8,
    sep: str = "\n\n",
) -> dict:
    """Chunked perplexity of `model` on `texts`: `{"ppl", "nll", "tokens", "chunks", "chunk", "bos"}`."""
    if batch_size < 1:
        raise UserError(f"perplexity batch size must be at least 1 (got {batch_size})")
    stream = token_stream(tok, texts, max_tokens=max_tokens, sep=sep)
    chunks = make_chunks(stream, chunk, bos, bos_id(tok) if bos != "none" else None)
    if not chunks:
        raise UserError(f"perplexity text too short: {len(stream)} tokens, fewer than one {chunk}-token chunk")
    total, count = chunk_nll(model, chunks, batch_size)
    nll = total / count
    return {"ppl": math.exp(nll), "nll": nll, "tokens": count, "chunks": len(chunks), "chunk": chunk, "bos": bos}


# --- text sources -----------------------------------------------------------------------------------------


def load_hub_text(name: str) -> list[str]:
    """WikiText-2 or PTB test split from the hub, joined the usual way into a single text."""
    import os

    from swm_ray.evaluation.zeroshot import hub_reachable

    repo, config, split, column, joiner = HUB_SETS[name]
    import datasets

    if os.environ.get("HF_DATASETS_OFFLINE") == "1" or not hub_reachable():
        try:  # offline (the zero-shot tasks set it) or no hub: a copy loaded before is in the datasets cache
            return [joiner.join(datasets.load_dataset(repo, config, split=split)[column])]
        except Exception:  # noqa: BLE001 - not cached: the one-line error below
            raise UserError(
                f"perplexity data {name!r} comes from the Hugging Face hub, which is unreachable (or offline mode "
                f"is set) and has no copy in the datasets cache: use --ppl-data builtin:boolq-passages or a local "
                f"file") from None
    try:
        rows = datasets.load_dataset(repo, config, split=split)[column]
    except Exception as e:  # noqa: BLE001 - any hub/dataset failure is the user's data source
        raise UserError(f"cannot load {name} ({repo}) from the hub: {str(e).splitlines()[0][:200]}") from None
    return [joiner.join(rows)]


def hub_text_name(source: str) -> str | None:
    """`wikitext2` or `ptb` when `source` names one of the hub's perplexity sets, else None."""
    key = source.strip().lower().replace("-", "")
    if key in {"wikitext2", "wikitext", "ptb"}:
        return "wikitext2" if key.startswith("wikitext") else "ptb"
    return None


def load_ppl_texts(source: str, text_column: str = "text") -> list[str]:
    """Texts for perplexity: `wikitext2` / `ptb` (hub), or any source `swm_ray.io.data.load_texts` reads."""
    hub = hub_text_name(source)
    if hub is not None:
        return load_hub_text(hub)
    from swm_ray.io import data

    return data.load_texts(source, text_column=text_column)
