"""Torch-side producers: read the model, tensors and the device, and turn what they read into events."""
