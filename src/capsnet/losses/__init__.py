"""Training losses: each takes (ModelOutput, Batch) and returns a dict holding "loss" and its named terms."""
