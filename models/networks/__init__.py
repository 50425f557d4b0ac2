"""Network builders (torch)."""
