"""`python -m higgs_lora <verb>`: the same as the `higgs-lora` command (cli.py)."""

from higgs_lora.cli import main

raise SystemExit(main())
