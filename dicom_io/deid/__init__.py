"""De-identification (DICOM PS3.15 Annex E, made safer than the table): the edge's
``deidentify`` and the modules it is made of.

- ``engine``: ``deidentify``, one instance in, its de-identified Part 10 out (or a refusal);
- ``profile``: Table E.1-1 and the agreement's options, as actions per attribute;
- ``walk``: every element at every depth, the table's action or one judged by its VR;
- ``raw``: element values read and written as bytes, for the walk's fast path;
- ``values``, ``text``: pseudonymous values, and free text cleaned (Clean Descriptors);
- ``private``: private blocks kept only where a safe-private list names them;
- ``burned_in``, ``ocr``: pixels that may show identity, quarantined or masked;
- ``leak``: the last check, no original identifying value in the output.
"""

from dicom_io.deid.engine import DEID_METHOD, BurnedInAnnotationError, DeidOutcome, deidentify

__all__ = ["DEID_METHOD", "BurnedInAnnotationError", "DeidOutcome", "deidentify"]
