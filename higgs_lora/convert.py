"""`python -m higgs_lora.convert` (Boson's original checkpoints into the transformers layout), kept because users'
commands name it.

The code is in higgs_lora.deploy.convert; see docs/deploy.md.
"""

from higgs_lora.deploy.convert import main

if __name__ == "__main__":
    raise SystemExit(main())
