"""Stop signals: SIGTERM and SIGUSR1 ask a training process to finish its step, checkpoint and exit 0.

They come from SLURM (the time-limit warning `--signal=USR1@T`, preemption, `scancel`, a requeue) or from a user's
`kill`. They are caught from the moment `launch/train.py` starts, not only once the loop runs: a warning that
arrives while the model is still loading would otherwise kill the rank (SIGUSR1's default action), and the
training loop acts on it at its first step. A second signal of the same kind stops the process at once.
"""

from __future__ import annotations

import signal

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_received: int | None = None


def _on_signal(signum, frame) -> None:
    global _received
    _received = signum
    signal.signal(signum, signal.SIG_DFL)  # a second signal stops at once


def catch() -> None:
    """Record SIGTERM/SIGUSR1 instead of dying of them (main thread only; idempotent, keeps what was received)."""
    for sig in SIGNALS:
        if sig != _received:
            signal.signal(sig, _on_signal)


def received() -> int | None:
    """The stop signal this process has received, if any."""
    return _received
