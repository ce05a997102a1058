"""The error every entry point turns into its message and exit code 2: a problem the user can fix.

Each stage raises its own subclass (`ConfigError`, `PlanError`, `CacheError`, ...), defined where the problem is
found; this module holds the base and the errors that several stages raise. Imports nothing.
"""

PARTLY_FAILED = 3
"""Exit code of a batch command (infer, its --join) that finished but could not do every item: the output is
written, and errors.jsonl says which items failed and why. 0 means every item was done, 1 none."""


class UserError(Exception):
    """A problem with what the user gave (config, paths, data, checkpoints), with what to do about it.

    `higgs_lora.cli.run_command` prints `error: <message>` and exits 2 for any subclass; anything else is a bug or a
    failure of the run and keeps its traceback.
    """

    exit_code = 2


class CheckpointError(UserError, ValueError):
    """A model directory that cannot be used as it is, with what to do about it."""
