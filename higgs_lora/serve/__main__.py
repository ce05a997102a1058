"""`python -m higgs_lora.serve`: the REST + WebSocket server."""

from higgs_lora.serve.app import main

raise SystemExit(main())
