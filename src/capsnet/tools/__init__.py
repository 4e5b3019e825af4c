"""Tools around training: the benchmark and the sweep report."""
