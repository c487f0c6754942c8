"""HTTP routes, one module per area; app.py puts them together."""
