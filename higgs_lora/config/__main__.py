"""`python -m higgs_lora.config`: print the resolved config, or every key with its help (`--help-keys`)."""

from higgs_lora.config.help import main

raise SystemExit(main())
