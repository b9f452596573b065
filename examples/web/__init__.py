"""A FastAPI web backend that sends GPU work through gpu-tasks without ever hanging."""
