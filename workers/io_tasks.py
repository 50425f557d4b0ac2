"""Thin Celery tasks of the io queue that deliver job outputs to DICOM nodes."""

from __future__ import annotations
