"""Result encoders: model output to standard DICOM objects (SEG, SR)."""
