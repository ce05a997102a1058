"""Runs launch/train.py with the training loss made NaN on chosen micro-batch calls (1-based, per rank).

    python tests/e2e/nan_harness.py 3,4 --ds ... --config ... key=value ...

Fault injection for the non-finite-loss tests: the product has no switch for it, so the test wraps the loss
function the trainer calls, and only for training forwards (evaluation forwards are not counted).
"""

import runpy
import sys
from pathlib import Path

import higgs_lora.train.loop as train_module

REPO_ROOT = Path(__file__).resolve().parents[2]
poisoned_calls = {int(x) for x in sys.argv[1].split(",")}
real_loss_sums = train_module.micro_batch_loss_sums
calls = 0


def poisoned_loss_sums(model, batch, text_loss=False):
    global calls
    sums = real_loss_sums(model, batch, text_loss)
    if model.training:
        calls += 1
        if calls in poisoned_calls:
            sums.audio = sums.audio * float("nan")
    return sums


train_module.micro_batch_loss_sums = poisoned_loss_sums
sys.argv = [str(REPO_ROOT / "launch" / "train.py"), *sys.argv[2:]]
runpy.run_path(sys.argv[0], run_name="__main__")
