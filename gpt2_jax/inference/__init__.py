"""Inference: jitted prefill + KV-cache decode loop (sampling.py), perplexity and multiple-choice scoring
(evaluate.py), and export of a checkpoint to a Hugging Face folder (export.py)."""
