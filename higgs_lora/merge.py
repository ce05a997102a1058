"""`python -m higgs_lora.merge` (fold a LoRA adapter into its base), kept because users' commands name it.

The code is in higgs_lora.deploy.merge; see docs/deploy.md.
"""

from higgs_lora.deploy.merge import main

if __name__ == "__main__":
    raise SystemExit(main())
