"""A deployment on this host: embedded Redis, local cluster, demo."""
