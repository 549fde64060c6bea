"""`python -m rlm_service run "PROMPT" --input FILE`: see `rlm_service.cli`."""

import sys

from .cli import main

sys.exit(main())
