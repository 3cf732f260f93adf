"""The reading room: readers, their worklist, the DICOMweb they view through, reports and
sign-off (design.md, "REVIEW"). Served by the center's Ray Serve cluster as its own application
under ``/read`` (:mod:`review.app`)."""
