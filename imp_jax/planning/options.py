"""The planner's choices as plain names, importable without JAX (the CLI's argument parser needs them)."""

PATHS = ("auto", "packed", "fallback", "dense")
DTYPES = ("bfloat16", "float32")
