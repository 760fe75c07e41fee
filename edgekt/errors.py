"""User-facing errors: one clear message, no deep traceback."""


class EdgektError(Exception):
    """An error caused by user input (config, data, checkpoint); the CLI prints it and exits 2."""
