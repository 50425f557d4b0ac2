"""Tests against real DICOM peers (Debian Orthanc, dcmtk) on loopback."""
