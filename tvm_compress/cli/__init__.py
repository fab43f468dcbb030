"""The ``tvm-compress`` command line: one module per command (``main`` dispatches)."""
