"""A Recursive Language Model service: a root model drives a Python REPL that holds the input.

Kept import-light on purpose: the REPL worker process imports `rlm_service.repl` without pulling in the
web stack. Import the engine from `rlm_service.engine`.
"""

__version__ = "0.1.0"
