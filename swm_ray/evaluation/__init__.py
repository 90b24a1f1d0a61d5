"""Evaluation of a (compressed) model: zero-shot accuracy, perplexity, latency, reports (`suite.py` runs them)."""
