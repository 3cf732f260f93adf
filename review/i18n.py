"""Terms and strings in ru / zh / en: the report's code -> term tables and the UI's messages.

Both are data (``review/data/templates.yaml``, ``review/data/ui.yaml``) that clinicians and
translators can review without reading code. Plural messages pick their form by CLDR's plural
rules through Babel (Russian has one / few / many). Chinese text is Simplified Chinese; it is
tagged ``zh-Hans`` in HTML and in the SR's language code.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

import yaml
from babel import Locale

from dicom_io.sr_parts import LANGUAGE_TAGS
from radbridge.errors import ConfigError

__all__ = [
    "LANG_TAGS",
    "Template",
    "TemplateFinding",
    "is_critical",
    "messages",
    "plural",
    "template_for",
    "template_json",
    "templates",
    "term",
]

LANGUAGES = ("ru", "zh", "en")
LANG_TAGS = LANGUAGE_TAGS  # HTML lang / RFC 5646 in the SR


@dataclass(frozen=True)
class TemplateFinding:
    scheme: str
    code: str
    terms: dict[str, str]
    critical: bool


@dataclass(frozen=True)
class Template:
    key: str
    title: dict[str, str]
    modalities: tuple[str, ...]
    findings: tuple[TemplateFinding, ...]


def _load(name: str) -> Any:
    return yaml.safe_load(resources.files("review").joinpath("data", name).read_text("utf-8"))


@cache
def templates() -> dict[str, Template]:
    raw = _load("templates.yaml")["templates"]
    out = {}
    for key, t in raw.items():
        findings = []
        for i, f in enumerate(t["findings"]):
            missing = [lang for lang in LANGUAGES if not str(f.get(lang, "")).strip()]
            if missing:
                raise ConfigError(f"templates.{key}.findings[{i}]: no term for {missing}")
            findings.append(
                TemplateFinding(
                    f["scheme"],
                    str(f["code"]),
                    {lang: f[lang] for lang in LANGUAGES},
                    bool(f.get("critical", False)),
                )
            )
        out[key] = Template(key, t["title"], tuple(t["modalities"]), tuple(findings))
    return out


def template_for(modality: str | None) -> Template:
    for t in templates().values():
        if modality in t.modalities:
            return t
    return templates()["chest-xr"]


def term(scheme: str, code: str, lang: str, fallback: dict[str, str] | None = None) -> str:
    """The term of a code in ``lang``: from the templates, else ``fallback`` (a manifest's
    display names), else the code itself."""
    for t in templates().values():
        for f in t.findings:
            if (f.scheme, f.code) == (scheme, code):
                return f.terms[lang]
    if fallback and fallback.get(lang):
        return fallback[lang]
    return f"{scheme} {code}"


def is_critical(scheme: str, code: str) -> bool:
    return any(
        f.critical and (f.scheme, f.code) == (scheme, code)
        for t in templates().values()
        for f in t.findings
    )


@cache
def messages(lang: str) -> dict[str, Any]:
    ui = _load("ui.yaml")
    if lang not in ui:
        raise ConfigError(f"locale: no interface strings for {lang}")
    base = ui["en"]
    missing = sorted(set(base) - set(ui[lang]))
    if missing:
        raise ConfigError(f"review/data/ui.yaml: {lang} lacks {missing}")
    return dict(ui[lang])


def plural(lang: str, key: str, n: int) -> str:
    """``key``'s message for count ``n``, in the plural form CLDR gives ``lang``."""
    forms = messages(lang)[key]
    form = Locale.parse(lang).plural_form(n)
    return str(forms.get(form, forms["other"])).format(n=n)


def template_json(template: Template, locale: str) -> dict[str, Any]:
    """The exam's template as the reading room shows it, in ``locale``."""
    return {
        "key": template.key,
        "title": template.title[locale],
        "findings": [
            {"scheme": f.scheme, "code": f.code, "term": f.terms[locale], "critical": f.critical}
            for f in template.findings
        ],
    }
