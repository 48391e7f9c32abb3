"""`python -m gpt2_jax.export --ckpt WORKDIR --out FOLDER`: a checkpoint as a Hugging Face GPT-2 folder.

The public name of gpt2_jax/inference/export.py.
"""

from gpt2_jax.inference.export import export_checkpoint, load_model, run

__all__ = ["export_checkpoint", "load_model"]

if __name__ == "__main__":
    run()
