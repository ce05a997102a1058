"""`python -m higgs_lora.infer`: batch voice cloning from a file of samples."""

from higgs_lora.infer.batch import main

raise SystemExit(main())
