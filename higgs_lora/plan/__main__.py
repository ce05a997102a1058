"""`python -m higgs_lora.plan`: what will fit, and why (a dry run of the planner)."""

from higgs_lora.plan.cli import main

raise SystemExit(main())
