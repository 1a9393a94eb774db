"""Training: protocols (what is frozen, stacked or cut), optimizer, sharded steps, the fit loop."""
