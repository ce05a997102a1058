"""Training: the data the loop reads, optimiser, loss, the loop around the DeepSpeed engine, checkpoints, metrics.

`run.py` is one run (plan -> build -> train -> save); `loop.py` the Trainer; `data.py`, `optim.py`, `loss.py`,
`checkpoint.py`, `metrics_log.py` and `flops.py` its parts. See docs/training.md.
"""
