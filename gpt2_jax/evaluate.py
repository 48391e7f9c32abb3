"""`python -m gpt2_jax.evaluate`: perplexity of a text, or multiple-choice (HellaSwag) accuracy.

The public name of gpt2_jax/inference/evaluate.py.
"""

from gpt2_jax.inference.evaluate import perplexity, run, score_multiple_choice

__all__ = ["perplexity", "score_multiple_choice"]

if __name__ == "__main__":
    run()
