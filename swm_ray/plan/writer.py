"""Writing a compressed model as a Hugging Face folder that loads with plain `from_pretrained`.

The folder holds sharded safetensors (+ `model.safetensors.index.json` when sharded), `config.json`,
`generation_config.json`, the tokenizer files, a `README.md` model card, the run's `config.yaml` (as given)
and `config.resolved.yaml`, `plan.json`, `metrics.json` when metrics are given, and, for plans that only
delete layers, a mergekit passthrough recipe `mergekit_config.yml`. It is written atomically: a failure
(including the reload check) leaves nothing at the output path.

The card is meant to be published: it prints no local path (a local source by its folder name, the output
folder and local paths of the configuration as `<local path>`); the recipe names a source mergekit can open.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from swm_ray.edits.architectures import per_layer_config_keys
from swm_ray.edits.fold import plan_fits
from swm_ray.errors import UserError
from swm_ray.io import fs as storage
from swm_ray.io.anatomy import decoder_layers, text_config, text_config_of
from swm_ray.io.outputs import atomic_output_dir, open_output
from swm_ray.io.remote import is_remote
from swm_ray.plan.card import render_model_card
from swm_ray.plan.mergekit import render_mergekit_config
from swm_ray.plan.plan import Plan

PROBE_TEXT = "The quick brown fox jumps over the lazy dog."


def check_consistent(model) -> None:
    """Raise RuntimeError unless layers, `num_hidden_layers` and every per-layer config list agree."""
    cfg = text_config(model)
    n = len(decoder_layers(model))
    if cfg.num_hidden_layers != n:
        raise RuntimeError(f"config.num_hidden_layers={cfg.num_hidden_layers} but the model has {n} layers")
    for key in per_layer_config_keys(cfg):
        if len(getattr(cfg, key)) != n:
            raise RuntimeError(f"config.{key} has {len(getattr(cfg, key))} entries for {n} layers")
    for pos, layer in enumerate(decoder_layers(model)):
        idx = getattr(getattr(layer, "self_attn", None), "layer_idx", pos)
        if idx != pos:
            raise RuntimeError(f"layer at position {pos} has self_attn.layer_idx={idx}")


def _probe_ids(tokenizer, vocab_size: int) -> torch.Tensor:
    """A few token ids, shape [1, T], from the tokenizer when there is one."""
    if tokenizer is not None:
        ids = tokenizer(PROBE_TEXT, return_tensors="pt").input_ids[:, :16]
        if ids.numel() > 0:
            return ids
    return (torch.arange(1, 9) % max(vocab_size, 1)).unsqueeze(0)


def verify_tokenizer(path: str | Path, tokenizer) -> None:
    """Raise RuntimeError unless `AutoTokenizer` reloads the saved tokenizer and it encodes like `tokenizer`.

    transformers 5 may pick a model-type-specific tokenizer class on reload (e.g. `Qwen2Tokenizer` for a
    qwen2 folder, rebuilt from vocab and merges): this catches a folder whose tokenizer would silently change.
    """
    try:
        reloaded = AutoTokenizer.from_pretrained(str(path))
    except Exception as e:  # any failure to reload means a broken output folder
        raise RuntimeError(f"the tokenizer saved to {path} does not reload: {str(e).splitlines()[0][:200]}") from e
    want = tokenizer(PROBE_TEXT).input_ids
    got = reloaded(PROBE_TEXT).input_ids
    if got != want:
        raise RuntimeError(
            f"the tokenizer saved to {path} reloads as {type(reloaded).__name__} and encodes differently "
            f"({got[:8]} vs {want[:8]})"
        )


def check_config_lists(config) -> None:
    """RuntimeError unless every per-layer list of a (text) config has `num_hidden_layers` entries."""
    cfg = text_config_of(config)
    for key in per_layer_config_keys(cfg):
        if len(getattr(cfg, key)) != cfg.num_hidden_layers:
            raise RuntimeError(f"config.{key} has {len(getattr(cfg, key))} entries for {cfg.num_hidden_layers} layers")


def check_tensors(ckpt, config) -> None:
    """RuntimeError unless the tensors (names, shapes) are exactly what the config's architecture needs.

    Checked from the headers against a skeleton on the meta device: no weights are loaded."""
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    want = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    head = skeleton.get_output_embeddings()
    tied = head is not None and head.weight is skeleton.get_input_embeddings().weight
    have = {k: info.shape for k, info in ckpt.infos.items()}
    missing = [k for k in want if k not in have and not (tied and k.endswith("lm_head.weight"))]
    extra = [k for k in have if k not in want]
    wrong = [k for k in want if k in have and have[k] != want[k]]
    if missing or extra or wrong:
        raise RuntimeError(f"the saved tensors do not match the config: missing {missing[:3]}, unexpected "
                           f"{extra[:3]}, wrong shape {wrong[:3]}")


@torch.no_grad()
def streamed_logits(ckpt, config, ids: torch.Tensor) -> torch.Tensor:
    """Logits of `ids` computed one decoder layer at a time from `ckpt` (a Checkpoint or PlanView)."""
    from swm_ray.compute.stack import StreamingStack

    dtype = next(iter(ckpt.infos.values())).torch_dtype
    stack = StreamingStack(ckpt, config, torch.device("cpu"), dtype if dtype.is_floating_point else torch.float32)
    pro = stack.prologue(ids)
    h = pro.hidden
    for i in range(stack.num_layers):
        with stack.layer(i) as layer:
            h = stack.run(layer, h, pro.kwargs[i])
    return stack.logits(stack.final(h))


def verify_folder(path: str | Path, tokenizer=None) -> torch.Tensor:
    """Check a written folder without loading a second copy of the model: the tokenizer reloads and encodes
    like `tokenizer`, the config's per-layer lists fit its depth, the tensors' headers match the config's
    architecture, and a few tokens run through it one layer at a time to finite logits (returned, [1, T, V])."""
    from swm_ray.io.checkpoint import Checkpoint
    from swm_ray.io.models import load_config

    if tokenizer is not None:
        verify_tokenizer(path, tokenizer)
    config = load_config(str(path))
    check_config_lists(config)
    ckpt = Checkpoint(path)
    check_tensors(ckpt, config)
    logits = streamed_logits(ckpt, config, _probe_ids(tokenizer, text_config_of(config).vocab_size))
    if not torch.isfinite(logits).all():
        raise RuntimeError(f"the saved model at {path} produces non-finite logits after reloading")
    return logits


def _write_text_files(
    folder: Path, plan: Plan, raw_yaml: str, resolved_yaml: str, metrics: dict | None, card: str, dtype: str
) -> None:
    (folder / "README.md").write_text(card)
    (folder / "config.yaml").write_text(raw_yaml)
    (folder / "config.resolved.yaml").write_text(resolved_yaml)
    plan.save(folder / "plan.json")
    if metrics is not None:
        (folder / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str) + "\n")
    recipe = render_mergekit_config(plan, dtype)
    if recipe is not None:
        (folder / "mergekit_config.yml").write_text(recipe)


def _save_weights(model, tokenizer, folder: Path, max_shard_size: str | int) -> None:
    model.save_pretrained(str(folder), max_shard_size=max_shard_size)
    if not (folder / "generation_config.json").exists():
        GenerationConfig.from_model_config(model.config).save_pretrained(str(folder))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))


def save_model_folder(
    model,
    tokenizer,
    out: str,
    *,
    plan: Plan,
    raw_yaml: str,
    resolved_yaml: str,
    metrics: dict | None = None,
    overwrite: bool = False,
    max_shard_size: str | int = "2GB",
    verify: bool = True,
) -> str:
    """Write an IN-MEMORY model as a folder at `out` (local or s3://) atomically; returns `out`.

    For models edited in memory (tests, healing); `write_model_folder` writes a plan applied to a checkpoint
    without ever holding the model. Before the folder is published it is checked by `verify_folder`. Raises
    UserError if `out` exists and is not ours (or is ours and `overwrite` is off); nothing is written then.
    """
    check_consistent(model)
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    card = render_model_card(plan, metrics=metrics, resolved_yaml=resolved_yaml, name=Path(str(out)).name)
    with atomic_output_dir(out, overwrite=overwrite) as staging:
        _save_weights(model, tokenizer, staging, max_shard_size)
        _write_text_files(staging, plan, raw_yaml, resolved_yaml, metrics, card, dtype)
        if verify:
            verify_folder(staging, tokenizer)
    return out if is_remote(out) else str(Path(out).resolve())


# -- the streaming writer: a plan applied to a checkpoint, tensor by tensor --------------------------------
class ChecksumMismatch(UserError):
    """The source's weights differ from those a plan was made from."""


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model", "chat_template.jinja",
                   "chat_template.json", "generation_config.json")


def shard_bytes(size: str | int) -> int:
    from swm_ray.io.sizes import parse_size

    return parse_size(size) if isinstance(size, str) else int(size)


def output_order(view) -> list[str]:
    """Embeddings first, then the decoder layers by position, then the rest (final norm, LM head)."""
    others = view.other_keys()
    first = [k for k in others if "embed" in k]
    layers = [k for i in range(view.num_layers) for k in view.layer_keys(i).values()]
    return first + layers + [k for k in others if k not in first]


def write_shards(view, sink, max_shard_size: str | int, hasher=None) -> list[str]:
    """Stream every tensor of `view` into safetensors shards through `sink`; returns the file names."""
    from swm_ray.io.checkpoint import INDEX_FILE, PlannedTensor, SafetensorsWriter, plan_shards, shard_names

    planned = [PlannedTensor(n, view.infos[n].dtype, view.infos[n].shape) for n in output_order(view)]
    shards = plan_shards(planned, shard_bytes(max_shard_size))
    names = shard_names(len(shards))
    source = getattr(view, "source", view)  # the checkpoint whose bytes a copied tensor comes from
    for name, tensors in zip(names, shards):
        with sink.open(name) as fh:
            w = SafetensorsWriter(fh, tensors)
            for t in tensors:
                key = view.source_of(t.name) if hasattr(view, "source_of") else t.name
                if key is not None and not source.pickled and w.copy_range(t.name, source.infos[key]):
                    if hasher is not None:
                        hasher.add_range(key)  # hashed on a thread while the kernel copies the next ones
                    continue
                w.write(t.name, view.read(t.name, hasher=hasher))
            w.close()
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(t.nbytes for t in planned)},
                 "weight_map": {t.name: n for n, ts in zip(names, shards) for t in ts}}
        sink.write_text(INDEX_FILE, json.dumps(index, indent=2) + "\n")
    return names + ([INDEX_FILE] if len(shards) > 1 else [])


def _small_files(source: Path, view, scratch: Path) -> None:
    """config.json of the edited model, and the source's tokenizer and generation files, into `scratch`."""
    import shutil

    view.config.save_pretrained(str(scratch))
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, scratch / name)
    if not (scratch / "generation_config.json").exists():
        GenerationConfig.from_model_config(view.config).save_pretrained(str(scratch))


def write_model_folder(
    source_path: str,
    plan: Plan,
    out: str,
    *,
    raw_yaml: str,
    resolved_yaml: str,
    metrics: dict | None = None,
    overwrite: bool = False,
    max_shard_size: str | int = "2GB",
    verify: bool = True,
    attention: str = "global",
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    expect_checksum: str | None = None,
) -> dict:
    """Apply `plan` to the checkpoint at `source_path` and write the model folder at `out`, never holding the
    model: kept layers are copied tensor by tensor under their new names, merged windows computed from their
    own layers, shards streamed into the output as they fill (to S3 as multipart uploads). Peak memory is one
    window's tensor plus small buffers. `plan` gets the source weights' checksum (`source_checksum`) and
    `params_after`; with `expect_checksum` a different checksum aborts before anything is published. Checked
    before publishing: locally by `verify_folder` on the written files; on S3 from the same computation
    (headers against the architecture, a streamed forward). Returns
    {"out", "files", "checksum", "params_after"}.
    """
    import tempfile

    from swm_ray.edits.architectures import check_supported_config
    from swm_ray.io.checkpoint import Checkpoint, WeightHasher
    from swm_ray.io.models import load_config, load_tokenizer
    from swm_ray.plan.executor import PlanView

    source = Path(source_path)
    config = load_config(source_path, trust_remote_code)
    check_supported_config(config)
    ckpt = Checkpoint(source_path, allow_pickle)
    view = PlanView(ckpt, config, plan.windows, plan.merge, attention, plan_fits(plan), width=plan.width,
                    width_tensors=plan.tensors)
    check_config_lists(view.config)
    tcfg = text_config_of(view.config)
    plan.params_after = view.param_count(bool(getattr(tcfg, "tie_word_embeddings", False)))
    hasher = WeightHasher(ckpt)
    dtype = next(iter(view.infos.values())).torch_dtype
    with tempfile.TemporaryDirectory(prefix="swm-ray-files-") as tmp, \
            open_output(out, overwrite=overwrite) as sink:
        scratch = Path(tmp)
        _small_files(source, view, scratch)
        files = write_shards(view, sink, max_shard_size, hasher)
        checksum = hasher.hexdigest()
        if expect_checksum is not None and checksum != expect_checksum:
            raise ChecksumMismatch(f"the weights at {source_path} are not those the plan was made from (checksum "
                                   f"{checksum[:19]}… vs the plan's {expect_checksum[:19]}…): apply it to its "
                                   f"own source and revision, or pass --force")
        plan.source_checksum = checksum
        card = render_model_card(plan, metrics=metrics, resolved_yaml=resolved_yaml, name=Path(str(out)).name)
        _write_text_files(scratch, plan, raw_yaml, resolved_yaml, metrics, card, str(dtype).removeprefix("torch."))
        sink.put_dir(scratch)
        if verify:
            tok = load_tokenizer(source_path, trust_remote_code)
            local = getattr(sink, "local_dir", None)
            if local is not None:
                verify_folder(local, tok)
            else:  # on S3: the small files as uploaded, the tensors as computed
                verify_tokenizer(scratch, tok)
                check_tensors(view, view.config)
                logits = streamed_logits(view, view.config, _probe_ids(tok, tcfg.vocab_size))
                if not torch.isfinite(logits).all():
                    raise RuntimeError(f"the model written to {out} produces non-finite logits")
    final = out if is_remote(out) else str(Path(out).resolve())
    return {"out": final, "files": files, "checksum": plan.source_checksum, "params_after": plan.params_after}


def update_metrics(out: str, plan: Plan, metrics: dict, resolved_yaml: str | None = None) -> None:
    """Put `metrics` into a written folder: `metrics.json`, and the model card rendered again with them.
    Each file is replaced whole (a temporary name renamed locally; one PUT on S3)."""
    card = render_model_card(plan, metrics=metrics, resolved_yaml=resolved_yaml, name=Path(str(out)).name)
    files = {"metrics.json": json.dumps(metrics, indent=2, default=str) + "\n", "README.md": card}
    for name, text in files.items():
        storage.replace_file(f"{out.rstrip('/')}/{name}", text.encode())
