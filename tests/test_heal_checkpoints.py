"""`heal --checkpoints DIR` (lora): a run keeps its checkpoints in a folder of its own under DIR, named by its
fingerprint and output, finds it there again with --resume and removes only it when done; a DIR holding anything
but heal runs' folders is refused with a one-line error and left as it was. Locally and on an S3 endpoint on
loopback (moto's threaded server)."""

from __future__ import annotations

import json
import secrets
from pathlib import Path

import pytest
from typer.testing import CliRunner

from swm_ray.cli import app
from swm_ray.config import build_config
from swm_ray.errors import UserError
from swm_ray.io import fs as storage
from swm_ray.io.remote import arrow_filesystem, is_remote, s3fs_filesystem

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(params=["local", "s3"])
def shared(request, tmp_path) -> str:
    """A checkpoint folder given with --checkpoints: local, or a fresh prefix of the S3 test bucket."""
    if request.param == "local":
        return str(tmp_path / "ckpts")
    request.getfixturevalue("s3")
    return f"s3://bucket/{secrets.token_hex(4)}/ckpts"


def _cfg(model: Path, data: Path, out: str, checkpoints: str, **extra):
    return build_config(flags={
        "model.source": str(model), "heal.data": str(data), "heal.lr": 1e-2, "heal.batch_size": 8,
        "heal.micro_batch_size": 4, "heal.warmup_steps": 0, "heal.cutoff": 16, "heal.log_every": 1,
        "heal.checkpoints": checkpoints, "out": out, **extra})


def _write_like_ray_train(folder: str, files: dict[str, bytes]) -> None:
    """Files written through pyarrow, as Ray Train writes its checkpoints (on S3 with its folder markers)."""
    fs, base = arrow_filesystem(folder)
    for name, data in files.items():
        path = f"{base}/{name}"
        fs.create_dir(path.rpartition("/")[0], recursive=True)
        with fs.open_output_stream(path) as f:
            f.write(data)


def _tree(root: str) -> dict[str, bytes]:
    """{relative path: bytes} of every file under `root` (local or S3)."""
    if is_remote(root):
        fs = s3fs_filesystem()
        fs.invalidate_cache()
        prefix = fs._strip_protocol(root).rstrip("/")
        return {p[len(prefix) + 1:]: fs.cat_file(p) for p in fs.find(prefix)}
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in Path(root).rglob("*") if p.is_file()}


FOREIGN = {"older-run/adapter.safetensors": b"not ours", "notes.txt": b"keep me"}


def test_a_folder_holding_other_files_is_refused_and_kept(shared, tiny_llama_dir, text_jsonl, tmp_path):
    from swm_ray.jobs.heal import _claim_checkpoints

    for name, data in FOREIGN.items():
        storage.replace_file(f"{shared}/{name}", data)
    cfg = _cfg(tiny_llama_dir, text_jsonl, str(tmp_path / "o"), shared)
    with pytest.raises(UserError, match=r"--checkpoints .*ckpts holds (notes.txt|older-run), which is not a heal "
                                        r"run's folder: give an empty folder"):
        _claim_checkpoints(cfg, str(tmp_path / "o"))
    assert _tree(shared) == FOREIGN  # nothing deleted, nothing written beside it


def test_runs_share_a_folder_and_each_removes_only_its_own(shared, tiny_llama_dir, text_jsonl, tmp_path):
    """Another run's folder (and one of a run still starting, no marker yet) stays untouched; this run's
    folder is found again by --resume, and its release removes that folder and nothing else."""
    from swm_ray.jobs.heal import MARKER, _claim_checkpoints, _interrupted, _release_checkpoints, run_folder

    out = str(tmp_path / "o")
    other_cfg = _cfg(tiny_llama_dir, text_jsonl, str(tmp_path / "other"), shared)
    other = _claim_checkpoints(other_cfg, str(tmp_path / "other"))
    _write_like_ray_train(other, {"lora/checkpoint_000000/adapter.safetensors": b"theirs"})
    starting = f"{shared}/heal-{'0' * 20}"
    _write_like_ray_train(starting, {"lora/.validate_storage_marker": b""})
    before = _tree(shared)

    cfg = _cfg(tiny_llama_dir, text_jsonl, out, shared)
    own = _claim_checkpoints(cfg, out)
    assert own == run_folder(cfg, out) and own.rpartition("/")[0] == shared and own not in (other, starting)
    assert json.loads(storage.read_bytes(f"{own}/{MARKER}"))["out"] == str(Path(out).resolve())
    _write_like_ray_train(own, {"lora/checkpoint_000000/adapter.safetensors": b"ours",
                                "lora/checkpoint_000000/trainer.json": b"{}"})
    assert _interrupted(cfg, out) and not _interrupted(cfg, str(tmp_path / "elsewhere"))
    with pytest.raises(UserError, match="add --resume"):
        _claim_checkpoints(cfg, out)
    assert _claim_checkpoints(cfg.model_copy(update={"resume": True}), out) == own

    _release_checkpoints(cfg, out, own)
    assert _tree(shared) == before  # the other runs' files, byte for byte; nothing of this run
    assert storage.exists(f"{other}/{MARKER}") and not _interrupted(cfg, out)


def test_lora_run_in_a_shared_folder(ray_session, tiny_llama_dir, text_jsonl, tmp_path, monkeypatch):
    """A real Ray Train run with --checkpoints in a folder another run uses: it checkpoints into its own folder
    there, and when it is done the other run's checkpoints are all still there and nothing of this run is left."""
    import swm_ray.jobs.heal as job

    shared = str(tmp_path / "ckpts")
    other = job._claim_checkpoints(_cfg(tiny_llama_dir, text_jsonl, str(tmp_path / "other"), shared),
                                   str(tmp_path / "other"))
    _write_like_ray_train(other, {"lora/checkpoint_000003/adapter.safetensors": b"theirs"})
    before = _tree(shared)

    out = str(tmp_path / "healed")
    cfg = _cfg(tiny_llama_dir, text_jsonl, out, shared, **{"heal.steps": 2, "heal.workers": 1})
    written = []
    fit_lora = job.fit_lora

    def spy(cfg, path, examples, schedule, root, *args, **kwargs):
        res = fit_lora(cfg, path, examples, schedule, root, *args, **kwargs)
        written.extend(p.relative_to(shared).as_posix() for p in Path(shared).rglob("adapter.safetensors"))
        return res

    monkeypatch.setattr(job, "fit_lora", spy)
    record = job.run_heal(cfg)["record"]
    own = job.run_folder(cfg, out).rpartition("/")[2]
    assert record.steps == 2 and (Path(out) / "heal.json").exists()
    assert any(w.startswith(f"{own}/lora/") for w in written)  # Ray Train wrote into the run's own folder
    assert _tree(shared) == before and not (Path(shared) / own).exists()


def test_refused_folder_is_a_one_line_error(tiny_llama_dir, text_jsonl, tmp_path):
    root = tmp_path / "ckpts"
    (root / "older-run").mkdir(parents=True)
    (root / "older-run" / "adapter.safetensors").write_bytes(b"not ours")
    res = CliRunner().invoke(app, ["heal", str(tiny_llama_dir), "--data", str(text_jsonl), "--checkpoints",
                                   str(root), "--out", str(tmp_path / "o"), "--set", "heal.cutoff=16"])
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert res.exit_code == 2 and len(lines) == 1, res.output
    assert lines[0].startswith("error: --checkpoints") and "older-run" in lines[0]
    assert (root / "older-run" / "adapter.safetensors").read_bytes() == b"not ours"


def _fake_fit(monkeypatch):
    """Ray Train left out: `fit_lora` writes a checkpoint into the run's folder and returns the fresh adapter (B
    zero), as a run would after its last step; `init_ray` does nothing."""
    from transformers import AutoModelForCausalLM

    import swm_ray.jobs.heal as job
    from swm_ray.heal.lora import adapter_state, apply_lora

    def fit(cfg, path, examples, schedule, root, *args, **kwargs):
        storage.replace_file(f"{root}/{job.RUN_NAME}/checkpoint_000001/adapter.safetensors", b"step 1")
        base = AutoModelForCausalLM.from_pretrained(path, dtype="float32")
        return {"adapter": adapter_state(apply_lora(base, cfg.heal, seed=cfg.heal.seed)),
                "state": {"history": [{"loss": 1.0, "tokens": 1, "seconds": 1.0}]}}

    monkeypatch.setattr(job, "fit_lora", fit)
    monkeypatch.setattr("swm_ray.jobs.runtime.init_ray", lambda *a, **k: None)
    return job


def test_a_heal_written_onto_its_own_folder_removes_its_checkpoints(tiny_llama_dir, text_jsonl, tmp_path,
                                                                    monkeypatch):
    """`heal M --out M --overwrite`: the run's checkpoint folder is named by M's weights, which the write changes;
    the folder it claimed is the one removed, so nothing is left and the same command runs again."""
    job = _fake_fit(monkeypatch)
    m = str(tmp_path / "m")
    job.run_heal(_cfg(tiny_llama_dir, text_jsonl, m, "", **{"heal.steps": 1, "heal.workers": 1}))
    for _ in range(2):
        cfg = _cfg(Path(m), text_jsonl, m, "", **{"heal.steps": 1, "heal.workers": 1, "overwrite": True})
        job.run_heal(cfg)
        assert not (tmp_path / ".m.heal").exists(), sorted(p.name for p in tmp_path.rglob("*"))


def test_checkpoints_inside_the_output_are_refused_before_anything_loads(tiny_llama_dir, text_jsonl, tmp_path,
                                                                          monkeypatch):
    job = _fake_fit(monkeypatch)
    out = tmp_path / "h"
    for inside in (str(out / "ckpt"), str(out)):
        with pytest.raises(UserError, match="inside --out") as e:
            job.run_heal(_cfg(tiny_llama_dir, text_jsonl, str(out), inside, **{"heal.steps": 1}))
        assert "\n" not in str(e.value) and not out.exists()
    cfg = _cfg(tiny_llama_dir, text_jsonl, str(out), str(out / "ckpt"),
               **{"heal.after_compress": "lora", "heal.steps": 1})
    with pytest.raises(UserError, match="inside --out"):
        job.run_compress_and_heal(cfg)
    assert not out.exists() and not (tmp_path / ".h.unhealed").exists()


def test_a_local_heal_after_width_pruning_is_refused_before_the_compress(tiny_llama_dir, text_jsonl, tmp_path):
    import swm_ray.jobs.heal as job

    cfg = _cfg(tiny_llama_dir, text_jsonl, str(tmp_path / "h"), "",
               **{"heal.after_compress": "local", "select.method": "flap", "select.ratio": 0.2, "select.layers": None})
    with pytest.raises(UserError, match="merges none") as e:
        job.run_compress_and_heal(cfg)
    assert "\n" not in str(e.value) and not (tmp_path / "h").exists() and not (tmp_path / ".h.unhealed").exists()
