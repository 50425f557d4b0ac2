"""Delivery of job outputs to configured DICOM nodes (C-STORE or STOW-RS), with retries."""
