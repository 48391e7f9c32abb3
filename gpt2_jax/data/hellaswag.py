"""HellaSwag's jsonl (`ctx`, `endings`, `label` per line) read into tokenised multiple-choice examples.

One reader for `python -m gpt2_jax.evaluate --hellaswag` and for the training loop's
config.train.hellaswag; the scoring rule both apply is gpt2_jax/model/scoring.py's.
"""

from __future__ import annotations

import dataclasses
import json


@dataclasses.dataclass(frozen=True)
class MultipleChoice:
    """A context, candidate endings (token ids) and the index of the right ending."""

    context: list[int]
    endings: list[list[int]]
    label: int


def load_hellaswag(path: str, limit: int = 0) -> list[MultipleChoice]:
    """The first `limit` examples of a HellaSwag jsonl (0 = all), tokenised with GPT-2's BPE.

    Endings are encoded with a leading space, as they continue the context's last word.
    """
    from gpt2_jax.data.tokenizer import get_tokenizer

    enc = get_tokenizer()
    examples = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
                ctx, endings, label = d["ctx"], d["endings"], int(d["label"])
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{line_no}: not a HellaSwag record with ctx, endings, label ({e})") from None
            examples.append(MultipleChoice(enc.encode(ctx), [enc.encode(" " + e) for e in endings], label))
            if limit and len(examples) >= limit:
                break
    return examples
