"""Ablation: configs/small.py with grouped-query attention (2 kv heads for 4 query heads).

    python train.py --config configs/gqa.py
"""

from configs import small


def get_config():
    c = small.get_config()
    c.model.n_kv_head = 2
    return c
