"""Dashboard backends: one sink per backend (TensorBoard, Visdom), their layouts, and their servers."""
