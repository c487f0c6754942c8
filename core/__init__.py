"""The shared core: settings, errors, the records both sources produce, metrics."""
