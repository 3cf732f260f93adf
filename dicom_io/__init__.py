"""The DICOM boundary: SCP, durable store, de-identification, STOW-RS, pixel decoding."""

__all__: list[str] = []
