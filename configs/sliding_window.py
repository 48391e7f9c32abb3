"""Ablation: configs/small.py with rotary positions and a 32-token sliding attention window.

    python train.py --config configs/sliding_window.py
"""

from configs import small


def get_config():
    c = small.get_config()
    c.model.position_embedding = "rotary"
    c.model.sliding_window = 32
    return c
