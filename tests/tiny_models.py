"""Tiny random-init models and a real offline tokenizer, shared by the tests.

`tiny_model(arch)` builds, for each supported architecture, a few-layer fp32 causal LM in eval mode with
hidden size 32 and vocab 512. Norm weights are randomised (they are constant at init) so that tests can
tell one layer's norms from another's. Hybrid architectures get small sliding windows and mixed
`layer_types`, so position-dependent attention actually matters at a sequence length of ~10.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3")
VOCAB = 512
TOKENIZER_VOCAB = 400  # byte-level BPE: 256 bytes + 4 specials + merges, below VOCAB
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]  # ids 0..3, matching the configs' pad/bos/eos ids below
SENTENCES = [
    "the quick brown fox jumps over the lazy dog",
    "a small model merges consecutive layers of a large language model",
    "sliding window merging compresses the depth of a transformer",
    "hello world this is a tiny tokenizer for tests",
    "layers that compute similar functions can be merged into one",
]

_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=128,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    initializer_range=0.2,
    tie_word_embeddings=False,
)


def _arch_kwargs(arch: str, n_layers: int) -> tuple[str, dict]:
    """(model_type, extra config kwargs) for `arch`."""
    if arch == "llama":
        return "llama", {}
    if arch == "mistral":
        return "mistral", {"sliding_window": 4}
    if arch in ("qwen2", "qwen3"):
        return arch, {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": n_layers // 2}
    if arch == "gemma2":
        return "gemma2", {"sliding_window": 4, "query_pre_attn_scalar": 8}
    if arch == "gemma3":
        types = ["full_attention" if (i + 1) % 3 == 0 else "sliding_attention" for i in range(n_layers)]
        return "gemma3_text", {"sliding_window": 4, "query_pre_attn_scalar": 8, "layer_types": types}
    raise ValueError(f"unknown tiny arch {arch!r}: choose one of {ARCHS}")


def tiny_config(arch: str, n_layers: int = 6):
    model_type, extra = _arch_kwargs(arch, n_layers)
    return AutoConfig.for_model(model_type, num_hidden_layers=n_layers, **{**_COMMON, **extra})


@torch.no_grad()
def _randomise_norms(model: torch.nn.Module, generator: torch.Generator) -> None:
    for name, p in model.named_parameters():
        if "norm" in name:
            p.add_(0.3 * torch.randn(p.shape, generator=generator, dtype=p.dtype))


def tiny_model(arch: str, n_layers: int = 6, seed: int = 0):
    """(random-init fp32 causal LM in eval mode, tiny tokenizer) for arch in ARCHS."""
    config = tiny_config(arch, n_layers)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _randomise_norms(model, torch.Generator().manual_seed(seed + 1))
    model.eval()
    return model, tiny_tokenizer()


def tiny_tokenizer(tmpdir: str | Path | None = None) -> PreTrainedTokenizerFast:
    """A real byte-level BPE fast tokenizer trained offline on a few sentences (specials at ids 0..3).

    Byte-level like the tokenizers of the supported LLMs, so transformers 5 re-interpreting it by model type
    (AutoTokenizer builds `Qwen2Tokenizer` from the vocab and merges for a qwen2 folder) encodes the same.
    When `tmpdir` is given the tokenizer is also saved there (loadable with AutoTokenizer).
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(SENTENCES, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    if tmpdir is not None:
        fast.save_pretrained(str(tmpdir))
    return fast


def tiny_gpt2():
    """A tiny GPT-2 (an architecture swm-ray does not support)."""
    config = AutoConfig.for_model(
        "gpt2", n_layer=2, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=64,
        bos_token_id=1, eos_token_id=2,
    )
    return AutoModelForCausalLM.from_config(config).eval()


def tiny_t5():
    """A tiny T5 encoder-decoder (not a causal decoder-only model)."""
    from transformers import AutoModelForSeq2SeqLM

    config = AutoConfig.for_model("t5", num_layers=2, d_model=32, d_ff=64, num_heads=4, d_kv=8, vocab_size=VOCAB)
    return AutoModelForSeq2SeqLM.from_config(config).eval()
