"""`python -m gpt2_jax.evaluate`: perplexity of a text, or multiple-choice (HellaSwag) accuracy.

The public name of gpt2_jax/inference/evaluate.py (scoring, loaded on first use) and of its command
line, gpt2_jax/inference/evaluate_cli.py.
"""

__all__ = ["perplexity", "score_multiple_choice"]  # noqa: F822 - loaded on first use (__getattr__)


def __getattr__(name: str):
    if name in __all__:
        from gpt2_jax.inference import evaluate

        return getattr(evaluate, name)
    raise AttributeError(f"module 'gpt2_jax.evaluate' has no attribute {name!r}")


if __name__ == "__main__":
    from gpt2_jax.inference.evaluate_cli import run

    run()
