"""Healing's training data (`load_examples`): instruction records (`instruction`, optional `input`, `output`)
rendered with the Alpaca template and the prompt masked from the loss; plain text packed into `cutoff`-token
pieces with the loss on every token; or pre-tokenized Parquet rows (`input_ids`)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from swm_ray.errors import UserError
from swm_ray.io import fs as storage
from swm_ray.io.remote import arrow_filesystem, is_remote

IGNORE = -100  # label of a token left out of the loss (the prompt, padding)
PROMPT = ("Below is an instruction that describes a task, paired with an input that provides further context. "
          "Write a response that appropriately completes the request.\n\n"
          "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
PROMPT_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                   "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
RECORD_FIELDS = ("instruction", "output")


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
    if not is_remote(source) and not Path(source).exists():
        raise UserError(f"data {source}: file not found")
    if kind == "parquet":
        import pyarrow.parquet as pq

        fs, path = arrow_filesystem(source)
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
