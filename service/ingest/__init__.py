"""Ingest: receive uploads, extract archives safely, scan headers, group into studies/series.

* :mod:`service.ingest.receive` streams a request body into a staging folder (size limits).
* :mod:`service.ingest.archive` extracts zip archives safely (bombs, traversal, corruption).
* :mod:`service.ingest.scan` reads each file's header (DICOM or NIfTI), keys the patient.
* :mod:`service.ingest.grouping` refuses mixed patients and groups files into studies/series.
* :mod:`service.ingest.geometry` summarises a series' grid from headers only.

Storing the result is :func:`service.store.studies.ingest_files`.
"""
