"""PLACEHOLDER."""
routes: list = []
