"""`python -m higgs_lora.evaluate` (score an inference output folder): kept because users' commands name it; the code is in higgs_lora.eval.cli."""

from higgs_lora.eval.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
