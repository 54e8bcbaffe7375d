"""Training: the loop, the strategies (single/dp/ddp), checkpoints, and the per-process entry point."""
