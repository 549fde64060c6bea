"""`python -m rlm_service serve | run | sample | mcp`: the installed `rlm-service`; see `rlm_service.cli`."""

import sys

from .cli import main

sys.exit(main())
