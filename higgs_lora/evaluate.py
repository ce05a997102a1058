"""`python -m higgs_lora.evaluate` (score an inference output folder), kept because users' commands name it.

The code is in higgs_lora.eval.cli; see docs/evaluation.md.
"""

from higgs_lora.eval.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
