"""Training: the loop (single process or under accelerate launch)."""
