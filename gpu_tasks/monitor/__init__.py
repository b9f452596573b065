"""Watching a deployment: Prometheus metrics and Flower."""
