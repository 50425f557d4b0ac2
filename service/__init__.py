"""The edges: CLI, HTTP, DICOM networking, store and file formats. Never imports torch."""
