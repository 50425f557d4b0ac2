"""The edges: CLI, HTTP, DICOM networking, store and file formats. Never imports torch."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("voxelgate")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0"
