"""What a model is: architecture specs and presets, exact parameter arithmetic, the adapter over stock
modules, slicing, export folders and the native modeling class.

`architecture.py` and `sizes.py` are pure arithmetic (no torch): the planner imports them."""
