"""Ablation: configs/small.py with rotary positions instead of learned ones.

    python train.py --config configs/rotary.py
"""

from configs import small


def get_config():
    c = small.get_config()
    c.model.position_embedding = "rotary"
    return c
