"""The command line: the config schema, the preflight check of overrides, one-line errors."""
