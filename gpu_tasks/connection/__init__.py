"""How producers and workers reach Redis: the URL, the broker, results."""
