"""De-identifiers as dataset -> dataset steps, shared by ``bench_deid`` and the comparator test
(``tests/test_deid_comparators.py``): radbridge's engine and dicognito, each set up once per run
the way its documentation shows."""

from __future__ import annotations

from collections.abc import Callable

from pydicom.dataset import Dataset

from dicom_io.deid import deidentify
from dicom_io.pseudonyms import Pseudonymizer
from radbridge.agreements import DeidOption

__all__ = ["Step", "dicognito", "radbridge"]

Step = Callable[[Dataset], Dataset]


def radbridge(options: tuple[DeidOption, ...], key: bytes) -> Callable[[], Step]:
    """radbridge's ``deidentify`` with one ``Pseudonymizer`` (one agreement key) per run."""

    def make() -> Step:
        pseudo = Pseudonymizer(key)
        return lambda ds: deidentify(ds, pseudo, options).dataset

    return make


def dicognito(seed: str) -> Callable[[], Step]:
    """dicognito's ``Anonymizer``, one per run, anonymizing in place."""

    def make() -> Step:
        from dicognito.anonymizer import Anonymizer

        anonymizer = Anonymizer(seed=seed)

        def step(ds: Dataset) -> Dataset:
            anonymizer.anonymize(ds)
            return ds

        return step

    return make
