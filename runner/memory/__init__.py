"""Memory planning: the four-part estimate, auto batch size, and the OOM post-mortem."""
