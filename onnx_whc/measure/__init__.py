"""What a model costs and how close it stays to its original: MACs and parameters (`metrics`), the checker
and latency (`validate`), and quality on held-out samples (`quality`)."""
