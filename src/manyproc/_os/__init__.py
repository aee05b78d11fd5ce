"""OS primitives: file descriptors, waiting, signals, CPU counting (DESIGN.md layer 1)."""
