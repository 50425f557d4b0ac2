"""Array transforms: intensity, noise estimation, figures (numpy only)."""
