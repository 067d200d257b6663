"""PyTorch backend (see backends/torch)."""
