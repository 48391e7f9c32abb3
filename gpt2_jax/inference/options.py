"""Checks of the sampling arguments, kept free of jax so the command line can refuse bad input in
a fraction of a second, before anything heavy loads (gpt2_jax.inference.sampling re-exports them)."""

from __future__ import annotations

import math

import numpy as np


def validate_sampling(*, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, num_samples: int = 1) -> None:
    """Raises ValueError naming the argument, its value and the rule it breaks."""
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature={temperature!r} must be a finite number >= 0 (0 = greedy)")
    if not (isinstance(top_k, (int, np.integer)) and not isinstance(top_k, bool) and top_k >= 0):
        raise ValueError(f"top_k={top_k!r} must be an integer >= 0 (0 = no top-k filter)")
    if not (isinstance(top_p, (int, float)) and 0.0 < top_p <= 1.0):
        raise ValueError(f"top_p={top_p!r} must be in (0, 1] (1 = no nucleus filter)")
    if not (isinstance(num_samples, (int, np.integer)) and not isinstance(num_samples, bool) and num_samples >= 1):
        raise ValueError(f"num_samples={num_samples!r} must be an integer >= 1")


# Drafts past the first few are rarely all kept, while every one widens each pass of the model.
MAX_SPECULATE = 64


def validate_speculate(speculate: int, *, has_draft: bool = False) -> None:
    """Raises ValueError unless `speculate` (drafted tokens per pass, 0 = off) is usable."""
    if not (isinstance(speculate, (int, np.integer)) and not isinstance(speculate, bool)
            and 0 <= speculate <= MAX_SPECULATE):
        raise ValueError(f"speculate={speculate!r} must be an integer in [0, {MAX_SPECULATE}] (0 = off)")
    if has_draft and speculate == 0:
        raise ValueError("speculate=0 with a draft model: drafting needs speculate >= 1 (tokens drafted per pass)")
