"""Which decoder architectures swm-ray edits, and the per-layer parts of their configs.

After a change of depth, transformers 5 validates that every per-layer config list (`layer_types`,
`mlp_layer_types`, ...) has exactly `num_hidden_layers` entries, and the model's forward indexes
`config.layer_types[i]` by position. This module finds those lists generically and slices them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from swm_ray.errors import UserError
from swm_ray.io.anatomy import text_config_of

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "gemma3_text")

# List-valued config attributes that are never per-layer, even when their length happens to match.
_NOT_PER_LAYER = frozenset(
    {
        "architectures",
        "bad_words_ids",
        "begin_suppress_tokens",
        "bos_token_id",
        "eos_token_id",
        "forced_decoder_ids",
        "pad_token_id",
        "suppress_tokens",
        "id2label",
        "label2id",
        "sep_token_id",
        "decoder_start_token_id",
    }
)
# Per-layer lists we know about: sliced whenever present, whatever their length says.
_KNOWN_PER_LAYER = ("layer_types", "mlp_layer_types")
# Integer counts of bottom layers with some property (Qwen2/Qwen3: full attention below this index).
_LAYER_COUNT_KEYS = ("max_window_layers",)


def model_types(config) -> list[str]:
    """The model_type of the top-level config and of its text config (they differ for multimodal models)."""
    names = [getattr(config, "model_type", None), getattr(text_config_of(config), "model_type", None)]
    return [n for n in dict.fromkeys(names) if n]


def check_supported(model) -> None:
    """Raise UserError unless the model is one of the decoder architectures swm-ray has been checked on."""
    check_supported_config(model.config, type(model).__name__)


def check_supported_config(config, what: str = "") -> None:
    """`check_supported` from a config alone (no weights needed)."""
    types = model_types(config)
    if not types or not any(t in SUPPORTED_MODEL_TYPES for t in types):
        shown = types[0] if types else what or type(config).__name__
        raise UserError(
            f"model type {shown!r} is not supported: swm-ray merges layers of "
            + ", ".join(SUPPORTED_MODEL_TYPES)
        )


def _config_keys(config) -> list[str]:
    """Attribute names of a config worth inspecting (its serialised keys plus the known per-layer ones)."""
    try:
        keys = list(config.to_dict().keys())
    except Exception:  # a config that cannot serialise itself: fall back to its instance attributes
        keys = list(vars(config).keys())
    return list(dict.fromkeys([*keys, *_KNOWN_PER_LAYER]))


def per_layer_config_keys(config) -> list[str]:
    """Names of config attributes that are per-layer lists (length == num_hidden_layers).

    `max_window_layers` is an integer count, not a list: see `layer_count_keys` and `slice_per_layer_config`.
    """
    n = getattr(config, "num_hidden_layers", None)
    if not isinstance(n, int):
        return []
    found = []
    for key in _config_keys(config):
        if key in _NOT_PER_LAYER or key.startswith("__"):
            continue
        value = getattr(config, key, None)
        if isinstance(value, (list, tuple)) and (key in _KNOWN_PER_LAYER or len(value) == n):
            found.append(key)
    return found


def layer_count_keys(config) -> list[str]:
    """Integer config attributes that count layers from the bottom (e.g. Qwen2's `max_window_layers`)."""
    return [k for k in _LAYER_COUNT_KEYS if isinstance(getattr(config, k, None), int)]


def slice_per_layer_config(config, kept: Sequence[int]) -> dict[str, Any]:
    """Make `config` describe a stack made of the original layers `kept` (new position -> original index).

    Sets `num_hidden_layers = len(kept)`, slices every per-layer list to `kept`, and recounts
    `max_window_layers` as the number of kept layers whose original index was below it (for a value at or
    above the old depth this is the new depth). Returns {key: new value} of what changed.
    """
    old_n = config.num_hidden_layers
    if any(not 0 <= i < old_n for i in kept):
        raise ValueError(f"kept layer indices {list(kept)} out of range for {old_n} layers")
    lists = per_layer_config_keys(config)
    counts = layer_count_keys(config)
    changes: dict[str, Any] = {"num_hidden_layers": len(kept)}
    for key in lists:
        value = getattr(config, key)
        if len(value) != old_n:
            raise ValueError(f"config.{key} has {len(value)} entries but num_hidden_layers is {old_n}")
        changes[key] = type(value)(value[i] for i in kept)
    for key in counts:
        limit = getattr(config, key)
        changes[key] = sum(1 for i in kept if i < limit)
    for key, value in changes.items():
        setattr(config, key, value)
    return changes
