"""Result writers: one module per DICOM object (SEG now; RTSTRUCT, SR, PDF follow)."""
