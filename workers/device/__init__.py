"""Device backends (found by name), the buffer store, kernels and values."""
