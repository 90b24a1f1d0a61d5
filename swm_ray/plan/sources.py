"""How a model folder names its source in public files: the kind of source (hub, builtin, local), the public
name of a builtin model, and local paths scrubbed from configs and cards."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from swm_ray.io.builtin import BUILTIN_HUB_IDS, BUILTIN_MODELS
from swm_ray.io.remote import is_remote

# -- what the card and the recipe may print: sources without local paths --------------------------------------
SOURCE_PLACEHOLDER = "PATH/TO/SOURCE_MODEL"
LOCAL_PLACEHOLDER = "<local path>"
# an absolute local path in free text (/a/b, ~/a); not part of a URL (s3://b/k), a hub id (org/name) or a ratio (1/2)
_LOCAL_PATH_RE = re.compile(r"(?<![\w:/.~-])(?:~|/[\w.-]+)(?:/[^\s`'\"|<>()\[\],;]*)+")


def source_kind(source: str) -> str:
    """How a model or data source is reached: `builtin`, `remote` (s3://, a URL), `local` (a path here), `hub`
    (an id like org/name) or `unknown` (empty); the rules of `models.resolve_model_path`, without the network."""
    if not source:
        return "unknown"
    if source.startswith("builtin:"):
        return "builtin"
    if is_remote(source) or "://" in source:
        return "remote"
    if source.startswith((".", "/", "~")) or source.count("/") > 1 or Path(source).expanduser().exists():
        return "local"
    return "hub"


def builtin_origin(source: str) -> tuple[str | None, str, str]:
    """(hub id of the original, package, file) of a `builtin:` source."""
    name = source.split(":", 1)[1]
    spec = BUILTIN_MODELS.get(name)
    return BUILTIN_HUB_IDS.get(name), spec.packages if spec else "a package", spec.gguf if spec else "a GGUF file"


def public_source(source: str, revision: str | None = None) -> str:
    """A model or data source as the model card prints it: a local path only by its last component."""
    kind = source_kind(source)
    if kind == "local":
        return f"a local folder or file (`{Path(source.rstrip('/')).name}`)"
    if kind == "unknown":
        return "an unrecorded source"
    text = f"`{source}`" + (f" at revision `{revision}`" if revision else "")
    if kind == "builtin":
        hub, package, filename = builtin_origin(source)
        if hub:
            text += f" (`{hub}`, from the GGUF file {filename} packaged in {package}, dequantized)"
    return text


def scrub_local_paths(text: str) -> str:
    """`text` with every absolute local path (/a/b, ~/a) replaced by a placeholder."""
    return _LOCAL_PATH_RE.sub(LOCAL_PLACEHOLDER, text)


def public_config(resolved_yaml: str) -> str:
    """The resolved YAML as the card shows it: the output folder and every local path (absolute, or relative and
    present here) replaced by a placeholder; `config.resolved.yaml` beside the card keeps them."""
    lines = []
    for line in resolved_yaml.splitlines():
        m = re.match(r"^(?P<head>\s*(?:-\s+)?(?:(?P<key>[\w.-]+):\s+)?)(?P<value>[^\s#].*?)\s*$", line)
        value = None
        if m:
            try:
                value = yaml.safe_load(m["value"])
            except yaml.YAMLError:
                pass
        if isinstance(value, str) and value:
            output = m["key"] == "out" and not line[:1].isspace() and not is_remote(value)
            if output or (source_kind(value) == "local" and ("/" in value or Path(value).expanduser().exists())):
                line = m["head"] + LOCAL_PLACEHOLDER
        lines.append(line)
    return scrub_local_paths("\n".join(lines))
