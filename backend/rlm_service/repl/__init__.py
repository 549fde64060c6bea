"""Where generated code runs: the executor, the worker process, and the server-side REPL handles.

The modules `capture`, `executor`, `procstat`, `protocol`, `sandbox`, `worker` and `zygote` use the standard
library only, because the worker process and its zygote import them.
"""
