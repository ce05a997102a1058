"""Logging: the `[stage] message` lines users see, through the standard `logging` module.

Every module logs to `get_logger("<stage>")` (a child of the `higgs_lora` logger); `setup_logging` (called once by
each entry point, see startup.py) prints INFO lines to stdout as `[stage] message` and warnings and errors to
stderr. A library user who never calls it gets Python's defaults: warnings only, nothing on stdout. Imports nothing
of the package.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings

ROOT = "higgs_lora"
QUIET, NORMAL, VERBOSE = -1, 0, 1
"""Verbosity levels: warnings and errors only; the usual `[stage]` lines; debug lines too."""
_LEVELS = {QUIET: logging.WARNING, NORMAL: logging.INFO, VERBOSE: logging.DEBUG}


def get_logger(stage: str) -> logging.Logger:
    """The logger of one stage (`prepare`, `plan`, `train`, ...): its lines print as `[stage] message`."""
    return logging.getLogger(f"{ROOT}.{stage}")


class _StageFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stage = record.name[len(ROOT) + 1 :] if record.name.startswith(ROOT + ".") else record.name
        message = record.getMessage()
        if record.exc_info:
            message += "\n" + self.formatException(record.exc_info)
        if record.levelno >= logging.WARNING and not message.startswith(("warning", "error")):
            message = f"{record.levelname.lower()}: {message}"
        return f"[{stage}] {message}"


class _StreamOf(logging.StreamHandler):
    """Writes to `sys.stdout` or `sys.stderr` as they are at each line (so pytest's capture and redirection see it),
    keeping records of `min_level` <= level < `below`."""

    def __init__(self, name: str, min_level: int, below: int = logging.CRITICAL + 1):
        super().__init__()
        self._name = name
        self.addFilter(lambda record: min_level <= record.levelno < below)

    @property
    def stream(self):
        return getattr(sys, self._name)

    @stream.setter
    def stream(self, value):  # StreamHandler.__init__ assigns it; the live sys stream is always used
        pass


def setup_logging(verbosity: int = NORMAL) -> None:
    """Route the package's log lines to the terminal: INFO (and DEBUG when verbose) to stdout, warnings to stderr.

    Idempotent: calling it again only changes the level."""
    root = logging.getLogger(ROOT)
    root.setLevel(_LEVELS[max(QUIET, min(VERBOSE, verbosity))])
    if not any(isinstance(h, _StreamOf) for h in root.handlers):
        for handler in (_StreamOf("stdout", logging.NOTSET, logging.WARNING), _StreamOf("stderr", logging.WARNING)):
            handler.setFormatter(_StageFormatter())
            root.addHandler(handler)
    root.propagate = False


def current_level() -> int | None:
    """The package's logging level if `setup_logging` has run in this process, else None."""
    root = logging.getLogger(ROOT)
    return root.level if any(isinstance(h, _StreamOf) for h in root.handlers) else None


def is_quiet() -> bool:
    """True when INFO lines are not printed (`--quiet`): progress bars follow the same switch."""
    return not logging.getLogger(ROOT).isEnabledFor(logging.INFO)


# ------------------------------------------------------------------------------------- other libraries' noise

LIBRARY_NOISE = {
    # logger name (where the record is made) -> messages of it that say nothing the user can act on
    "bitsandbytes.backends.cpu.ops": (r"pip install kernels",),
    "DeepSpeed": (
        r"^Setting accelerator to CPU",  # every process on a CPU machine, before anything else
        r"untested optimizer",  # our AdamW over LoRA parameters is the one DeepSpeed wraps; nothing to do
        r"^Unable to find hostfile",  # one host: the launcher's default
    ),
    "torch.utils.cpp_extension": (r"No CUDA runtime is found",),  # CPU machines, when DeepSpeed builds its CPU ops
}
"""Warnings of libraries (as `logging` records) that `quiet_libraries` drops: listed one by one, so anything new
still shows."""

LIBRARY_WARNINGS = (
    # (category, module regex, message regex) for `warnings.filterwarnings`
    (FutureWarning, r"transformers(\.|$)", r".*is deprecated"),  # transformers' own renames (v6), not our calls'
)


class _DropNoise(logging.Filter):
    def __init__(self, patterns: tuple[str, ...]):
        super().__init__()
        self._patterns = [re.compile(p) for p in patterns]

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(p.search(message) for p in self._patterns)


def progress_bars_wanted() -> bool:
    """Progress bars only on a terminal: in a log file or a pipe a `\r`-redrawn bar is one long spliced line."""
    return sys.stderr.isatty() and not is_quiet()


def quiet_libraries() -> None:
    """Drop `LIBRARY_NOISE` and `LIBRARY_WARNINGS`, and the libraries' progress bars (transformers' "Loading weights",
    datasets' "Saving the dataset") where stderr is not a terminal. Called by every entry point (startup.start),
    before the libraries are imported; what it sets in the environment reaches the processes they start."""
    for name, patterns in LIBRARY_NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNoise) for f in logger.filters):
            logger.addFilter(_DropNoise(patterns))
    for category, module, message in LIBRARY_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    if not progress_bars_wanted():
        # Read when huggingface_hub / transformers / datasets are imported: bars off in their tqdm wrappers.
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
        # Already imported (a command run inside another, a test): switch their bars off directly.
        for module, switch in (
            ("transformers.utils.logging", "disable_progress_bar"),
            ("datasets.utils.tqdm", "disable_progress_bars"),
            ("huggingface_hub.utils", "disable_progress_bars"),
        ):
            if module in sys.modules:
                getattr(sys.modules[module], switch)()
