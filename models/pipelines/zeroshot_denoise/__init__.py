"""Zero-shot (single-scan, self-supervised) denoising; importing this package imports no torch."""
