"""The model-holding actor: one replica on its own device, statistics over the minibatches it is handed."""

from __future__ import annotations

import numpy as np
import ray

from swm_ray.config import ModelConfig


@ray.remote
class ModelActor:
    """Holds one model replica; every method delegates to the Ray-free library and returns O(L²) data."""

    def __init__(self, model_cfg: dict, threads: int):
        from swm_ray.models import load_model, set_threads

        set_threads(threads)
        cfg = ModelConfig(**model_cfg)
        self.model, _ = load_model(
            cfg.source,
            device=cfg.device,
            dtype=cfg.dtype,
            allow_pickle=cfg.allow_pickle,
            trust_remote_code=cfg.trust_remote_code,
            revision=cfg.revision,
            with_tokenizer=False,
        )

    def num_layers(self) -> int:
        from swm_ray.models import decoder_layers

        return len(decoder_layers(self.model))

    def hsic_sums(self, input_ids: np.ndarray, batch: tuple[int, int], kernel: str, skip: int):
        """HSIC sums of one minibatch: ((L+1, L+1) float64, 1, tokens)."""
        from swm_ray.capture import compute_hsic_sums

        return compute_hsic_sums(self.model, input_ids, [batch], kernel=kernel, skip_first_tokens=skip)

    def init_scorer(self, input_ids: np.ndarray, batches: list, criterion: str, method: str) -> int:
        """Build the candidate scorer over this actor's minibatches; returns the number of crops."""
        from swm_ray.scoring import ShardScorer

        self.scorer = ShardScorer(self.model, input_ids, batches, criterion, method)
        return sum(b - a for a, b in batches)

    def score(self, candidates: list) -> list:
        """(sum, count) per candidate window over this actor's shard."""
        return self.scorer.score([tuple(c) for c in candidates])

    def commit(self, window: tuple) -> None:
        self.scorer.commit(tuple(window))

    def reset(self) -> None:
        self.scorer.reset()
