import pytest

from dicom_io.stow import decode_multipart, encode_multipart
from radbridge.errors import DatasetError


def test_round_trip_keeps_bytes_exactly() -> None:
    parts = [b"\x00\r\n--not-a-boundary\r\n", b"DICM" * 100, b""]
    body, ctype = encode_multipart(parts)
    assert 'type="application/dicom"' in ctype
    assert decode_multipart(body, ctype) == parts


@pytest.mark.parametrize(
    ("ctype", "match"),
    [
        ("application/json", "multipart/related"),
        ('multipart/related; type="application/json"; boundary=x', "multipart type"),
        ('multipart/related; type="application/dicom"', "no boundary"),
    ],
)
def test_bad_envelopes_are_named(ctype: str, match: str) -> None:
    with pytest.raises(DatasetError, match=match):
        decode_multipart(b"--x\r\n\r\nabc\r\n--x--", ctype)


def test_missing_closing_boundary() -> None:
    with pytest.raises(DatasetError, match="closing boundary"):
        decode_multipart(
            b"--b\r\nContent-Type: application/dicom\r\n\r\nabc", "multipart/related; boundary=b"
        )
