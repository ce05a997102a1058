"""`python -m higgs_lora.prepare` (corpus -> codec-token cache), kept because users' commands name it.

The code is in higgs_lora.data.prepare.
"""

from higgs_lora.data.prepare import main

if __name__ == "__main__":
    raise SystemExit(main())
