"""Thin Celery tasks of the io queue that fetch PACS-query cohorts."""

from __future__ import annotations
