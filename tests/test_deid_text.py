import pytest

from dicom_io.deid.text import clean_text, identity_terms
from tests.conftest import make_instance


@pytest.fixture
def terms() -> list[str]:
    return identity_terms(make_instance())


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        ("ID 11010519491231002X checked", "11010519491231002X"),
        ("СНИЛС 112-233-445 95", "112-233-445 95"),
        ("СНИЛС 11223344595", "11223344595"),
        ("паспорт 45 08 123456", "45 08 123456"),
        ("call +86 138 0013 8000 ok", "138 0013 8000"),
        ("call 13800138000 ok", "13800138000"),
        ("tel +7 (912) 345-67-89", "345-67-89"),
        ("mail wang.xd@example.cn", "example.cn"),
        ("CHEST PA 王小东", "王"),
        ("CHEST PA for XiaoDong", "XiaoDong"),
        ("chest pa pid-7788123", "7788123"),
        ("acc ACC99812 done", "ACC99812"),
        ("born 1965-04-12", "1965-04-12"),
        ("born 12.04.1965", "12.04.1965"),
        ("born 1965年4月12日", "1965"),
    ],
)
def test_identifiers_are_cut_out(terms: list[str], text: str, secret: str) -> None:
    cleaned = clean_text(text, terms)
    assert cleaned is None or secret not in cleaned


def test_ideographic_name_from_the_pn_is_removed(terms: list[str]) -> None:
    assert "王" in terms and "小东" in terms and "XiaoDong" in terms
    assert clean_text("CHEST PA for Wang^XiaoDong=王^小东", terms) == "CHEST PA for"


def test_harmless_text_is_kept(terms: list[str]) -> None:
    assert clean_text("PA view, inspiration", terms) == "PA view, inspiration"
    assert clean_text("CT CHEST W/O CONTRAST", terms) == "CT CHEST W/O CONTRAST"


@pytest.mark.parametrize(
    "text",
    [
        "Seen by Anna Smirnova",
        "Иванов Иван Иванович",
        "врач Иванов И.И.",
        "李明先生 复查",
        "患者张伟",
    ],
)
def test_uncertain_values_are_removed_whole(terms: list[str], text: str) -> None:
    assert clean_text(text, terms) is None


def test_inflected_forms_of_long_terms_go_whole() -> None:
    assert clean_text("к Петрову", ["Петров"]) == "к"


def test_short_latin_terms_match_whole_words_only() -> None:
    assert clean_text("lung apex", ["Lu"]) == "lung apex"
    assert clean_text("Lu apex", ["Lu"]) == "apex"
