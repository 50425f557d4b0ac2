"""Zero-shot (single-scan, self-supervised) denoising. Importing this package does not import torch."""
