"""Model sources and loading: a source resolved to a local folder, the tokenizer, config and model loaded from it.

Sources: `builtin:NAME` (a GGUF file shipped in registry packages, converted once into the cache; see
`builtin.py`), a local HF folder, a hub id, or `s3://...` (mirrored into the cache). Safetensors only unless
`allow_pickle`; remote code only when `trust_remote_code`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from swm_ray.errors import UserError
from swm_ray.io.anatomy import decoder_layers
from swm_ray.io.builtin import BUILTIN_MODELS, convert_builtin
from swm_ray.io.cache import cache_lock, cache_root, download_to_cache
from swm_ray.io.remote import is_remote

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


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
                    convert_builtin(name, target)
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
