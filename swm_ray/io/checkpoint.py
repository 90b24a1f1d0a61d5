"""The weights of a model folder, read one tensor at a time, and safetensors files written one tensor at a time.

A `Checkpoint` indexes every tensor of a local Hugging Face folder from the safetensors headers alone (name,
dtype, shape, file, byte range) and reads a tensor with one `seek` + `readinto` into a fresh buffer: no
memory map, so a pass over a 140 GB checkpoint never holds more than the tensors the caller keeps.
Pickle checkpoints (`*.bin`, `*.pt`) are read only when the caller allows pickle, through
`torch.load(mmap=True, weights_only=True)`.

`SafetensorsWriter` writes one file whose header (names, shapes, dtypes, offsets) is known before any data:
tensors are streamed into it in header order, so a shard never has to exist in memory as a whole.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import struct
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from swm_ray.errors import UserError

INDEX_FILE = "model.safetensors.index.json"
PICKLE_INDEX_FILE = "pytorch_model.bin.index.json"
_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_CODES = {v: k for k, v in _DTYPES.items()}
_LAYER_KEY = re.compile(r"^(?P<prefix>.*\.layers)\.(?P<index>\d+)\.(?P<rest>.+)$")


def dtype_code(dtype: torch.dtype) -> str:
    if dtype not in _CODES:
        raise ValueError(f"safetensors cannot store {dtype}")
    return _CODES[dtype]


def element_size(code: str) -> int:
    return torch.empty((), dtype=_DTYPES[code]).element_size()


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: file, dtype code (safetensors' spelling), shape, byte range in that file."""

    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int = 0  # absolute byte offset of the data in `file` (safetensors); unused for pickle files
    stop: int = 0

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * element_size(self.dtype)

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]


def read_header(path: Path) -> tuple[dict, int]:
    """(header dict without __metadata__, absolute offset of the data section) of one safetensors file."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise UserError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", raw)
        if n > 100 * 2**20:
            raise UserError(f"{path}: not a safetensors file (header length {n})")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise UserError(f"{path}: corrupt safetensors header") from None
    header.pop("__metadata__", None)
    return header, 8 + n


class Checkpoint:
    """Index of the weight tensors of a local model folder (see the module docstring)."""

    def __init__(self, path: str | Path, allow_pickle: bool = False):
        self.path = Path(path)
        self.allow_pickle = allow_pickle
        self.infos: dict[str, TensorInfo] = {}
        self.pickled = False
        self._pickle_cache: dict[Path, dict] = {}
        files = self._weight_files()
        for f in files:
            self._index(f)
        if not self.infos:
            raise UserError(f"model {path}: no weight tensors found")
        self.layer_prefix, self.num_layers = self._find_layers()

    # -- indexing ------------------------------------------------------------------------------------------
    def _weight_files(self) -> list[Path]:
        safetensors = sorted(self.path.glob("*.safetensors"))
        index = self.path / INDEX_FILE
        if index.exists():
            names = json.loads(index.read_text()).get("weight_map", {}).values()
            safetensors = [self.path / n for n in dict.fromkeys(names)]
            missing = [str(p.name) for p in safetensors if not p.exists()]
            if missing:
                raise UserError(f"model {self.path}: {INDEX_FILE} names missing files {missing[:3]}")
        if safetensors:
            return safetensors
        pickled = sorted([*self.path.glob("*.bin"), *self.path.glob("*.pt")])
        if pickled and not self.allow_pickle:
            raise UserError(f"model {self.path}: no .safetensors weights; pass --allow-pickle to load pickle "
                            f"(.bin) files")
        if not pickled:
            raise UserError(f"model {self.path}: no weight files (*.safetensors)")
        self.pickled = True
        return pickled

    def _index(self, f: Path) -> None:
        if self.pickled:
            for name, t in self._load_pickle(f).items():
                self.infos[name] = TensorInfo(name, f, dtype_code(t.dtype), tuple(t.shape))
            return
        header, base = read_header(f)
        for name, h in header.items():
            if h["dtype"] not in _DTYPES:
                raise UserError(f"{f}: tensor {name} has dtype {h['dtype']}, which swm-ray does not read")
            a, b = h["data_offsets"]
            self.infos[name] = TensorInfo(name, f, h["dtype"], tuple(h["shape"]), base + a, base + b)

    def _load_pickle(self, f: Path) -> dict:
        if f not in self._pickle_cache:
            self._pickle_cache[f] = torch.load(f, map_location="cpu", mmap=True, weights_only=True)
        return self._pickle_cache[f]

    def _find_layers(self) -> tuple[str, int]:
        """The key prefix of the decoder layers (`model.layers`) and their number. Of several stacks (a vision
        tower beside the text decoder) the one with the most layers whose prefix ends in `model.layers` wins."""
        found: dict[str, set[int]] = {}
        for name in self.infos:
            m = _LAYER_KEY.match(name)
            if m:
                found.setdefault(m["prefix"], set()).add(int(m["index"]))
        if not found:
            return "", 0
        prefix = max(found, key=lambda p: (p.endswith("model.layers"), len(found[p])))
        n = max(found[prefix]) + 1
        if len(found[prefix]) != n:
            raise UserError(f"model {self.path}: decoder layers {sorted(set(range(n)) - found[prefix])[:5]} have no "
                            f"weights in the checkpoint")
        return prefix, n

    # -- names ---------------------------------------------------------------------------------------------
    def layer_keys(self, i: int) -> dict[str, str]:
        """{name inside the decoder layer (`self_attn.q_proj.weight`): checkpoint key} of layer i."""
        head = f"{self.layer_prefix}.{i}."
        return {k[len(head):]: k for k in self.infos if k.startswith(head)}

    def layer_of(self, name: str) -> tuple[int, str] | None:
        """(layer index, name inside the layer) of a decoder-layer key, else None."""
        m = _LAYER_KEY.match(name)
        if m and m["prefix"] == self.layer_prefix:
            return int(m["index"]), m["rest"]
        return None

    def other_keys(self) -> list[str]:
        """Keys outside the decoder layers (embeddings, final norm, LM head, ...), in file order."""
        return [k for k in self.infos if self.layer_of(k) is None]

    # -- sizes ---------------------------------------------------------------------------------------------
    def nbytes(self, keys: Iterable[str] | None = None) -> int:
        return sum(self.infos[k].nbytes for k in (self.infos if keys is None else keys))

    def layer_nbytes(self, i: int) -> int:
        return self.nbytes(self.layer_keys(i).values())

    def layer_params(self, i: int) -> int:
        return sum(self.infos[k].numel for k in self.layer_keys(i).values())

    def param_count(self, tied_embeddings: bool = False) -> int:
        """Parameters stored (an LM head stored beside tied embeddings counted once)."""
        total = sum(t.numel for t in self.infos.values())
        if tied_embeddings:
            heads = [k for k in self.infos if k.endswith("lm_head.weight")]
            embeds = [k for k in self.infos if k.endswith("embed_tokens.weight")]
            if heads and embeds:
                total -= self.infos[heads[0]].numel
        return total

    # -- reading -------------------------------------------------------------------------------------------
    def read(self, name: str, dtype: torch.dtype | None = None, hasher=None) -> torch.Tensor:
        """A fresh CPU tensor holding `name` (cast to `dtype` when given). `hasher(name, raw bytes)` sees the
        stored bytes before any cast."""
        info = self.infos[name]
        if self.pickled:
            t = self._load_pickle(info.file)[name]
            if hasher is not None:
                hasher(name, t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
            return t.to(dtype) if dtype is not None else t.clone()
        raw = torch.empty(info.stop - info.start, dtype=torch.uint8)
        if raw.numel():
            with open(info.file, "rb") as f:
                f.seek(info.start)
                got = f.readinto(memoryview(raw.numpy()))
            if got != raw.numel():
                raise UserError(f"{info.file}: truncated tensor {name} ({got} of {raw.numel()} bytes)")
        if hasher is not None:
            hasher(name, memoryview(raw.numpy()))
        t = raw.view(info.torch_dtype).reshape(info.shape)
        return t.to(dtype) if dtype is not None and dtype != t.dtype else t

    def layer_state(self, i: int, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """{name inside the layer: tensor} of decoder layer i, read from disk."""
        return {rest: self.read(key, dtype) for rest, key in self.layer_keys(i).items()}


class WeightHasher:
    """Checksum of a checkpoint's tensors that does not depend on the order they are read in: sha256 of the
    sorted (name, dtype, shape, sha256 of the bytes) of every tensor. Feed it tensors as `Checkpoint.read`
    reads them, or byte ranges of the files (`add_range`, hashed on a background thread while the caller
    copies them)."""

    CHUNK = 8 << 20

    def __init__(self, ckpt: Checkpoint):
        self.ckpt = ckpt
        self.digests: dict[str, str] = {}
        self._pending: dict[str, Future] = {}
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="swm-hash")

    def __call__(self, name: str, data) -> None:
        if name not in self.digests and name not in self._pending:
            self.digests[name] = hashlib.sha256(data).hexdigest()

    def add_range(self, name: str) -> None:
        """Hash a tensor from its file on the background thread (sha256 and reads release the GIL)."""
        if name in self.digests or name in self._pending:
            return
        if self.ckpt.pickled:
            self.ckpt.read(name, hasher=self)
            return
        info = self.ckpt.infos[name]
        self._pending[name] = self._pool.submit(_hash_range, info.file, info.start, info.stop, self.CHUNK)

    def missing(self) -> list[str]:
        return [k for k in self.ckpt.infos if k not in self.digests and k not in self._pending]

    def hexdigest(self) -> str:
        for name in self.missing():  # tensors the caller never needed (e.g. the bottom of a reference window)
            self.add_range(name)
        for name, fut in self._pending.items():
            self.digests[name] = fut.result()
        self._pending.clear()
        self._pool.shutdown()
        h = hashlib.sha256()
        for name in sorted(self.digests):
            info = self.ckpt.infos[name]
            h.update(f"{name}\0{info.dtype}\0{list(info.shape)}\0{self.digests[name]}\n".encode())
        return "sha256:" + h.hexdigest()


def _hash_range(path: Path, start: int, stop: int, chunk: int) -> str:
    h = hashlib.sha256()
    buf = bytearray(min(chunk, max(stop - start, 1)))
    view = memoryview(buf)
    with open(path, "rb") as f:
        f.seek(start)
        left = stop - start
        while left > 0:
            got = f.readinto(view[: min(len(buf), left)])
            if not got:
                raise UserError(f"{path}: truncated while hashing")
            h.update(view[:got])
            left -= got
    return h.hexdigest()


def weights_stamp(path: str | Path) -> list[tuple[str, int, int]]:
    """(name, size, mtime in ns) of a local model folder's weight files and config.json: a cheap identity of
    its contents (no byte is read) that changes when the folder is rewritten, e.g. by `compress --overwrite`."""
    p = Path(path)
    files = sorted({*p.glob("*.safetensors"), *p.glob("*.bin"), *p.glob("*.pt"), *p.glob("*.json")})
    return [(f.name, (st := f.stat()).st_size, st.st_mtime_ns) for f in files
            if f.is_file() and f.name not in REPORTS]


REPORTS = ("eval.json", "eval.raw.json", "metrics.json")  # what an evaluation writes beside the weights


def local_weights_identity(source: str) -> str | None:
    """For a model given as a local folder, a short hash of `weights_stamp`: what tells a resumed run that the
    folder was rewritten in place since it started. None for other sources, whose names already say which
    weights they are (a builtin, a hub revision; an S3 object is mirrored again when it changes)."""
    from swm_ray.io.remote import is_remote

    if is_remote(source) or source.startswith("builtin:"):
        return None
    p = Path(source).expanduser()
    if not p.is_dir():
        return None
    return hashlib.sha256(json.dumps(weights_stamp(p)).encode()).hexdigest()[:16]


def weights_checksum(ckpt: Checkpoint) -> str:
    """The `WeightHasher` checksum of every tensor of `ckpt` (reads all of it)."""
    return WeightHasher(ckpt).hexdigest()


@dataclass(frozen=True)
class PlannedTensor:
    """One tensor of an output file: name, dtype code, shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = element_size(self.dtype)
        for s in self.shape:
            n *= s
        return n


def plan_shards(tensors: list[PlannedTensor], max_shard_bytes: int) -> list[list[PlannedTensor]]:
    """Split tensors (in order) into shards of at most `max_shard_bytes` (a bigger tensor gets its own)."""
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return [s for s in shards if s]


def shard_names(n: int) -> list[str]:
    if n == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


class SafetensorsWriter:
    """Streams tensors into one safetensors file whose contents are declared up front (`tensors`, in order)."""

    def __init__(self, fh: BinaryIO, tensors: list[PlannedTensor], metadata: dict[str, str] | None = None):
        self.fh = fh
        self.expected = list(tensors)
        header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
        offset = 0
        for t in tensors:
            header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
            offset += t.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned, as safetensors writes it
        fh.write(struct.pack("<Q", len(raw)))
        fh.write(raw)
        self._next = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        want = self.expected[self._next]
        if name != want.name or tuple(tensor.shape) != want.shape or dtype_code(tensor.dtype) != want.dtype:
            raise RuntimeError(f"writer expected {want} next, got {name} {tuple(tensor.shape)} {tensor.dtype}")
        data = tensor.detach().cpu().contiguous()
        if data.numel():
            self.fh.write(memoryview(data.view(torch.uint8).reshape(-1).numpy()))
        self._next += 1

    def copy_range(self, name: str, info: TensorInfo) -> bool:
        """Write the next tensor straight from its byte range in a safetensors file, in the kernel (sendfile)
        when the output is a local file; False when it is not (the caller writes the tensor instead)."""
        want = self.expected[self._next]
        if name != want.name or info.shape != want.shape or info.dtype != want.dtype or not info.stop:
            raise RuntimeError(f"writer expected {want} next, got {name} {info.shape} {info.dtype}")
        try:
            out = self.fh.fileno()
        except (AttributeError, OSError, io.UnsupportedOperation):
            return False
        self.fh.flush()
        with open(info.file, "rb") as src:
            offset, left = info.start, info.stop - info.start
            while left > 0:
                sent = os.sendfile(out, src.fileno(), offset, left)
                if sent == 0:
                    raise UserError(f"{info.file}: truncated tensor {name}")
                offset += sent
                left -= sent
        self._next += 1
        return True

    def close(self) -> None:
        if self._next != len(self.expected):
            raise RuntimeError(f"safetensors file closed after {self._next} of {len(self.expected)} tensors")


def iter_layer_keys(ckpt: Checkpoint, layers: Iterable[int]) -> Iterator[tuple[int, str, str]]:
    """(layer, name inside the layer, checkpoint key) for the given layers, in each layer's key order."""
    for i in layers:
        for rest, key in ckpt.layer_keys(i).items():
            yield i, rest, key
