"""dicom_io.result_warm_up: the builders' warm-up goes through the real builders."""

from __future__ import annotations

import numpy as np

from dicom_io.result_builders import AlgorithmInfo, Nodule, nodule_seg_and_sr
from dicom_io.result_warm_up import made_up_ct, warm_up


def test_warm_up_runs_the_real_builders_on_a_made_up_ct() -> None:
    """The Api runs this before it is ready: it goes through the real builders, so a change
    that breaks them on a plain CT fails here, not at the first study."""
    assert warm_up() > 0
    sources = made_up_ct(slices=6, size=16)
    mask = np.zeros((6, 16, 16), dtype=bool)
    mask[2:4, 3:9, 3:9] = True
    nodule = Nodule((0.0, 0.0, 7.5), diameter_mm=4.0, volume_mm3=20.0, segment_number=1)
    algo = AlgorithmInfo("warm-up", "0", "radbridge", "0" * 64, "test")
    seg, sr = nodule_seg_and_sr(sources, mask, [nodule], algo)
    assert seg.Modality == "SEG" and sr.Modality == "SR"
    referenced = seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence
    assert {str(r.ReferencedSOPInstanceUID) for r in referenced} == {
        str(s.SOPInstanceUID) for s in sources
    }
