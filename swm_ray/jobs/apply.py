"""`swm-ray apply`: execute a written plan on its source model with the same writer as `compress` (no
selection), so re-running a chosen grid row or zoo entry, or moving a recipe to another cluster, is one command.
"""

from __future__ import annotations

import time

from swm_ray.config import RunConfig, dump_yaml
from swm_ray.errors import UserError
from swm_ray.io.probes import check_run_paths


def run_apply(cfg: RunConfig, plan_path: str, model: str | None = None, force: bool = False,
              raw_yaml: str = "") -> dict:
    """Apply the plan at `plan_path` to `model` (default: the plan's own source and revision; `cfg.model`
    gives the revision and loading options) and write the folder at `cfg.out`. The source's depth must match
    the plan's, and its weights the plan's checksum (a one-line error unless `force`)."""
    from swm_ray.io.models import check_decoder, resolve_model_path
    from swm_ray.plan.plan import Plan
    from swm_ray.plan.writer import write_model_folder

    t0 = time.perf_counter()
    plan = Plan.load(plan_path)
    m = cfg.model
    source = model or plan.source_model
    revision = m.revision if m.revision is not None else (plan.source_revision if source == plan.source_model
                                                          else None)
    if not source:
        raise UserError(f"plan {plan_path} names no source model: give the MODEL to apply it to")
    if (plan.extra or {}).get("heal"):
        raise UserError(f"plan {plan_path} is a healed model's: apply would write it unhealed (healing trains "
                        f"weights a plan does not hold); apply the plan, then run `swm-ray heal` on the result")
    out = cfg.out or "swm-ray-applied"
    check_run_paths(out, cfg.overwrite, [source])
    path = resolve_model_path(source, revision, allow_pickle=m.allow_pickle, trust_remote_code=m.trust_remote_code)
    depth = check_decoder(path, m.trust_remote_code)
    if depth != plan.num_layers_before and not force:
        raise UserError(f"model {source} has {depth} decoder layers but the plan was made for "
                        f"{plan.num_layers_before}: apply it to its own source, or pass --force")
    expect = None if force else plan.source_checksum
    written = write_model_folder(path, plan, out, raw_yaml=raw_yaml, resolved_yaml=dump_yaml(cfg),
                                 overwrite=cfg.overwrite, attention=plan.attention, allow_pickle=m.allow_pickle,
                                 trust_remote_code=m.trust_remote_code, expect_checksum=expect)
    return {"out": written["out"], "plan": plan.to_dict(), "source": source, "revision": revision,
            "checked": expect is not None, "seconds": round(time.perf_counter() - t0, 2)}
