"""`python -m higgs_lora.prepare --config X.yaml [key=value ...]`: corpus -> codec-token cache (see data/prepare.py)."""

from higgs_lora.data.prepare import main

if __name__ == "__main__":
    raise SystemExit(main())
