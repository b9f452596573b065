"""Examples of gpu-tasks producers (not part of the installed package)."""
