"""Tools around the passes: the command line, checkpoints, diagnostics, model zoo."""
