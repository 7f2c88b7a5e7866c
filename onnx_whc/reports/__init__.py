"""What the user reads: the prune, analysis and sweep reports, their plots, and `bench`'s timings and
per-layer profile."""
