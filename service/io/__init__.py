"""File formats: DICOM series, NIfTI, NRRD/MHA <-> Volume; derived DICOM; atomic output."""
