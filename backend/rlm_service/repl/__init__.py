"""Where generated code runs: the executor, the worker process, and the server-side REPL handles.

The modules `capture`, `executor`, `protocol`, `sandbox` and `worker` use the standard library only,
because the worker process imports them.
"""
