"""Input and output at the edges: atomic files, checkpoints, model loading."""
