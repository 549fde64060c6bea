"""`python -m rlm_service serve | run | attach | cancel | session | sample | mcp`: the same as the installed
`rlm-service`; see `rlm_service.cli`."""

import sys

from .cli import main

sys.exit(main())
