"""Model repository, manifests, synthetic phantoms, and demo-model training and export.

Modules: ``manifest`` (typed model manifests), ``transforms`` (the one MONAI preprocessing
pipeline used by training and serving), ``phantoms`` and ``phantom_dicom`` (synthetic chest
radiographs and DICOM studies), ``repository`` (validated model repository) and ``cxr_demo``
(the demo chest radiograph classifier). Import the submodules directly.
"""

__all__: list[str] = []
