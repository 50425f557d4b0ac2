"""DICOM networking: configured nodes, routing rules, the listener (SCP) and the SCU side."""
