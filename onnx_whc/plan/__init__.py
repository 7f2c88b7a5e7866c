"""Which channels go: filter criteria, the selection by ratio, MACs budgets, the allocator's per-group
sensitivity, measured channel widths, and the searches for a quality floor or a speed target."""
