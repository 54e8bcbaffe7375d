"""Process hygiene: signals, the run registry, the supervisor, cleanup. Never imports torch."""
