"""Training: the mesh and the one logical-axis rules table (sharding.py), the optimizer and schedule
(optim.py), a run's pieces built once from the config (run.py), the pure sharded train / eval steps
(step.py), the loop (trainer.py), checkpoints (checkpoint.py), multi-host start-up (distributed.py) and
the cost report before a run (preflight.py)."""
