"""Document helpers for swm-ray's offline lm-eval task definitions (loaded by lm-eval via `!function`).

They reproduce the standard lm-eval tasks' document handling, so prompts and choices are identical.
This file is copied next to the generated task YAMLs at run time; it must only import the standard library
(and `datasets`, which lm-eval itself needs).
"""

from __future__ import annotations

import re

_BRACKETED = re.compile(r"\[.*?\]")


def _clean_hellaswag(text: str) -> str:
    """Strip WikiHow artefacts: ' [title]' becomes a sentence break, other [tags] are dropped."""
    text = text.strip().replace(" [title]", ". ")
    text = _BRACKETED.sub("", text)
    return text.replace("  ", " ")


def hellaswag_doc(doc: dict) -> dict:
    context = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    return {
        "query": _clean_hellaswag(doc["activity_label"] + ": " + context),
        "choices": [_clean_hellaswag(ending) for ending in doc["endings"]],
        "gold": int(doc["label"]),
    }


def hellaswag_process_docs(dataset):
    """Add `query`, `choices` and `gold` to every HellaSwag row."""
    return dataset.map(hellaswag_doc)


def winogrande_text(doc: dict) -> int:
    """Index of the correct option: WinoGrande scores the shared continuation under each filled-in context."""
    return {"1": 0, "2": 1}[doc["answer"]]


def winogrande_target(doc: dict) -> str:
    """The sentence after the blank (the continuation that is scored)."""
    cut = doc["sentence"].index("_") + 1
    return doc["sentence"][cut:].strip()


def winogrande_choices(doc: dict) -> list[str]:
    """The sentence up to the blank, completed by each option (the contexts)."""
    cut = doc["sentence"].index("_")
    return [doc["sentence"][:cut] + option for option in (doc["option1"], doc["option2"])]
