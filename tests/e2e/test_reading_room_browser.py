"""The reading room in a real browser (Playwright driving Debian's Chromium) against a running
stack: Orthanc as the hospital PACS sends a STAT chest radiograph, a routine one and a chest CT
of the same patient under agreement A; a second hospital sends a radiograph under agreement B,
which another reading center serves.

A Russian-speaking reader of A's center signs in and sees only A's studies, the STAT one
first; reads the STAT radiograph with the keyboard only (accept one AI finding, reject one with
a reason, write the impression, sign); reads the CT with the mouse (scroll, lung window, the
SEG overlay and nodule marker, the prior radiograph side by side, accept, sign) while the test
counts clicks and seconds; gets 404 for every route of B's study. Readers in Chinese and
English see the same page in their language (CJK text in the self-hosted Noto Sans SC).
Not one request of any page leaves the center's origin. The signed reports reach Orthanc
re-identified, VERIFIED and FINAL, one per report language, and pass dciodvfy.

Screenshots (worklist, viewer, report per locale) go to ``var/test-output/reading-room/``.
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pydicom
import pytest

from models.ct_dicom import write_ct_series
from models.ct_phantoms import chest_ct
from models.cxr_dicom import write_cxr_study
from radbridge.contract import tls_verify
from tests.conftest import REPO
from tests.dciodvfy import dciodvfy
from tests.e2e.stack import add_reader, stack_report, stack_with_pacs, storescu
from tests.e2e.test_reading_room import _wait_for_reports

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]
playwright_api = pytest.importorskip("playwright.sync_api")  # a dev dependency: always there

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SHOTS = REPO / "var" / "test-output" / "reading-room"
PASSWORD = "a reader's long password"
OTHER = "other-hospital-to-other-center"
OTHER_CENTER = "Other Reading Center (local)"
CENTER = "Demo Reading Center (local)"


def _add_other_agreement(raw: dict[str, Any]) -> None:
    """Agreement B: another hospital (its own AE title) read by another reading center."""
    b = copy.deepcopy(raw["agreements"][0])
    b["id"] = OTHER
    b["hospital"]["name"] = "Other Hospital (local)"
    b["hospital"]["calling_ae_titles"] = ["OTHER_PACS"]
    b["reading_center"] = {"name": OTHER_CENTER, "country": "RU"}
    b["transfer_basis"]["reference"] = "DEMO-LOCAL-0001"
    raw["agreements"].append(b)


def _stat(files: list[Path]) -> list[Path]:
    """Mark a study STAT the way an order does: (0040,1003) Requested Procedure Priority."""
    for f in files:
        ds = pydicom.dcmread(f)
        ds.RequestedProcedurePriority = "STAT"
        ds.save_as(f, enforce_file_format=True)
    return files


def _wait_for_worklist(client: httpx.Client, base: str, count: int, data: Path) -> list[Any]:
    """The reader's worklist once ``count`` studies (AI ended) are on it."""
    deadline = time.monotonic() + 420
    rows: list[Any] = []
    while time.monotonic() < deadline:
        rows = client.get(f"{base}/api/worklist").json()["rows"]
        if len(rows) >= count:
            return rows
        time.sleep(2)
    pytest.fail(f"{len(rows)} of {count} studies on the worklist:\n{stack_report(data)}")


@contextmanager
def _signed_in(stack: dict[str, Any], username: str) -> Iterator[httpx.Client]:
    with httpx.Client(verify=tls_verify(stack["ca"]), timeout=30) as client:
        r = client.post(
            f"{stack['base']}/read/api/login", json={"username": username, "password": PASSWORD}
        )
        assert r.status_code == 204, r.text
        yield client


class Browser:
    """One Chromium for the test; every page's requests are recorded for the origin check."""

    def __init__(self, pw: Any, base: str) -> None:
        self.base = base
        self.browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        self.requests: list[str] = []
        self.console_errors: list[str] = []

    @contextmanager
    def page(self, locale: str) -> Iterator[Any]:
        # The center's certificate is issued by the throwaway CA `radbridge up` made; the test
        # browser does not trust it (the httpx clients do, through tls_verify).
        context = self.browser.new_context(
            ignore_https_errors=True,
            locale=locale,
            timezone_id="Asia/Shanghai",
            viewport={"width": 1600, "height": 1000},
        )
        page = context.new_page()
        page.on("request", lambda r: self.requests.append(r.url))
        page.on(
            "console",
            lambda m: self.console_errors.append(m.text) if m.type == "error" else None,
        )
        try:
            yield page
        finally:
            context.close()

    def sign_in(self, page: Any, username: str) -> None:
        page.goto(f"{self.base}/read/")
        assert page.url.endswith("/read/login")  # no session: the sign-in page
        page.fill("#username", username)
        page.fill("#password", PASSWORD)
        page.click("button[type=submit]")
        page.wait_for_selector("#worklist tbody tr", timeout=60_000)


def test_reader_reads_in_the_browser_and_the_reports_reach_the_pacs(tmp_path: Path) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    with stack_with_pacs(tmp_path, _add_other_agreement) as (pacs, stack):
        base, data = str(stack["base"]), Path(str(stack["data"]))
        # Agreement A, from Orthanc: patient 1's routine radiograph and chest CT (the
        # radiograph is the CT's prior), patient 2's STAT radiograph with two findings.
        routine = write_cxr_study(
            tmp_path / "routine",
            seed=78,
            findings={"cardiomegaly"},
            patient_name="Li^Na=李^娜",
            patient_id="PACS-42",
            birth_date="19700101",
            accession="ACC-9001",
        )
        stat = _stat(
            write_cxr_study(
                tmp_path / "stat",
                seed=79,
                findings={"cardiomegaly", "pleural_effusion"},
                patient_name="Wang^Fang=王^芳",
                patient_id="PACS-43",
                birth_date="19650505",
                accession="ACC-9002",
            )
        )
        ct = write_ct_series(
            tmp_path / "ct",
            chest_ct(np.random.default_rng([20261123, 7]), n_nodules=1),
            seed=8,
            patient_name="Li^Na=李^娜",
            patient_id="PACS-42",
            birth_date="19700101",
            accession="ACC-9003",
        )
        orthanc_study = {}
        for name, files in (("routine", routine), ("stat", stat), ("ct", ct)):
            ids = [pacs.upload(f) for f in files]
            orthanc_study[name] = pacs.study_of(ids[0])
            pacs.send_study_to("radbridge", orthanc_study[name])
        # Agreement B: another hospital's radiograph, straight to the edge.
        other = write_cxr_study(
            tmp_path / "other",
            seed=80,
            findings={"pneumothorax"},
            patient_name="Zhao^Lei=赵^磊",
            patient_id="OTHER-7",
            birth_date="19800808",
            accession="ACC-OTHER-1",
        )
        sent = storescu(stack["ports"]["edge"], other, calling="OTHER_PACS")
        assert sent.returncode == 0, sent.stdout + sent.stderr

        add_reader(stack, "ivanova", PASSWORD, "RB-0007", "--center", CENTER)
        add_reader(stack, "li", PASSWORD, "RB-0008", "--locale", "zh", "--center", CENTER)
        add_reader(stack, "smith", PASSWORD, "RB-0009", "--locale", "en", "--center", CENTER)
        add_reader(stack, "petrov", PASSWORD, "RB-0100", "--center", OTHER_CENTER)
        read = f"{base}/read"
        with _signed_in(stack, "ivanova") as a_api, _signed_in(stack, "petrov") as b_api:
            rows_a = _wait_for_worklist(a_api, read, 3, data)
            rows_b = _wait_for_worklist(b_api, read, 1, data)
            assert {r["agreement_id"] for r in rows_a} == {"demo-hospital-to-center"}
            assert [r["agreement_id"] for r in rows_b] == [OTHER]
            b_id = rows_b[0]["study_id"]
            b_uid = b_api.get(f"{read}/api/studies/{b_id}").json()["study_uid"]
        stat_row = rows_a[0]
        assert stat_row["priority"] == "stat" and stat_row["modality"] in ("CR", "DX")
        assert len(stat_row["ai_summary"]) >= 2, stat_row  # two findings: accept one, reject one
        ct_row = next(r for r in rows_a if r["modality"] == "CT")

        sync_playwright = playwright_api.sync_playwright
        with sync_playwright() as pw:
            browser = Browser(pw, base)
            with browser.page("ru-RU") as page:
                browser.sign_in(page, "ivanova")
                _reader_a_in_russian(page, read, stat_row, ct_row, b_id, b_uid)
            for locale, user in (("zh-CN", "li"), ("en-US", "smith")):
                with browser.page(locale) as page:
                    browser.sign_in(page, user)
                    _screens_in(page, locale[:2])
            browser.browser.close()
        foreign = [u for u in browser.requests if not u.startswith((base + "/", "data:", "blob:"))]
        assert browser.requests and not foreign, foreign
        assert any("/read/static/viewer/fonts/noto-sans-sc-" in u for u in browser.requests)
        assert not [e for e in browser.console_errors if "Content Security Policy" in e]

        # The signed reports at the PACS: re-identified, VERIFIED / FINAL, ru + zh + en.
        for name, accession in (("stat", "ACC-9002"), ("ct", "ACC-9003")):
            reports = _wait_for_reports(pacs, orthanc_study[name], 3, stack)
            for i, sr in enumerate(reports):
                assert str(sr.AccessionNumber) == accession
                assert (sr.VerificationFlag, sr.PreliminaryFlag) == ("VERIFIED", "FINAL")
                assert "PatientIdentityRemoved" not in sr
                dciodvfy(sr, tmp_path, f"{name}-report-{i}")
            texts = [
                str(e.value) for sr in reports for e in sr.iterall() if e.keyword == "TextValue"
            ]
            if name == "stat":
                assert any("Не подтверждается" in t for t in texts), texts  # the reason
        print(f"screenshots: {SHOTS}")
        print(stack_report(data, 5))


def _status(page: Any) -> dict[str, str]:
    return dict(
        page.eval_on_selector("#viewer-status", "e => ({...e.dataset, text: e.textContent})")
    )


def _wait_status(page: Any, condition: str, timeout_ms: int = 90_000) -> dict[str, str]:
    page.wait_for_function(
        f"(() => {{ const d = document.getElementById('viewer-status')?.dataset; "
        f"return d && ({condition}); }})()",
        timeout=timeout_ms,
    )
    return _status(page)


def _reader_a_in_russian(
    page: Any, read: str, stat_row: dict[str, Any], ct_row: dict[str, Any], b_id: int, b_uid: str
) -> None:
    # The worklist: A's three studies only, STAT first, Russian plural and a dated deadline.
    rows = page.locator("#worklist tbody tr")
    assert rows.count() == 3
    assert "Other Hospital" not in page.content()
    assert "stat" in (rows.nth(0).get_attribute("class") or "")
    assert page.get_attribute("html", "lang") == "ru"
    assert "исследования" in page.inner_text("#count")  # CLDR "few": 3 исследования
    assert rows.nth(0).locator("time").count() == 1
    page.screenshot(path=str(SHOTS / "worklist-ru.png"), full_page=True)

    # Agreement B does not exist for this reader: 404 on every route, empty searches.
    api = page.request
    for url in (
        f"{read}/api/studies/{b_id}",
        f"{read}/dicomweb/studies/{b_uid}/series",
        f"{read}/dicomweb/studies/{b_uid}/metadata",
    ):
        assert api.get(url).status == 404, url
    headers = {"Origin": read.rsplit("/read", 1)[0], "Content-Type": "application/json"}
    assert api.post(f"{read}/api/studies/{b_id}/claim", headers=headers).status == 404
    assert (
        api.put(f"{read}/api/studies/{b_id}/report", headers=headers, data=json.dumps({})).status
        == 404
    )
    search = api.get(f"{read}/dicomweb/studies?StudyInstanceUID={b_uid}")
    assert search.status == 204, search.text()  # QIDO-RS: no match is 204 No Content
    assert api.get(f"{read}/api/worklist?agreement={OTHER}").json()["rows"] == []

    # The STAT radiograph, keyboard only: Enter opens the first row, A accepts the focused
    # finding, R rejects the next (the reason typed into the prompt), I focuses the
    # impression, Ctrl+Enter signs.
    keys = 0
    page.keyboard.press("Enter")
    keys += 1
    page.wait_for_selector(".finding", timeout=60_000)
    _wait_status(page, "Number(d.count) >= 1")
    findings = page.locator(".finding")
    assert findings.count() == len(stat_row["ai_summary"])
    page.keyboard.press("a")
    page.once("dialog", lambda d: d.accept("Не подтверждается на снимке"))
    page.keyboard.press("r")
    keys += 2
    assert "accepted" in (findings.nth(0).get_attribute("class") or "")
    assert "rejected" in (findings.nth(1).get_attribute("class") or "")
    page.keyboard.press("i")
    impression = "Одна находка ИИ подтверждена, вторая отклонена. Контроль по клинике."
    page.keyboard.type(impression)
    keys += 1
    page.screenshot(path=str(SHOTS / "report-ru.png"), full_page=True)
    page.keyboard.press("Control+Enter")
    keys += 1
    page.wait_for_function(
        "document.getElementById('result')?.textContent.includes('final')", timeout=60_000
    )
    page.wait_for_selector("#worklist tbody tr", timeout=30_000)  # back to the worklist
    assert page.locator("#worklist tbody tr").count() == 2
    print(f"keyboard-only STAT radiograph read: {keys} key actions (impression typed once)")

    # The CT with the mouse: open it, scroll, lung window, SEG + marker, prior beside, accept,
    # impression, sign. Clicks and seconds are counted from the worklist to the signature.
    clicks = 0
    t0 = time.monotonic()
    page.click(f"#worklist tbody tr[data-id='{ct_row['study_id']}']")
    clicks += 1
    first = _wait_status(page, "Number(d.count) > 1 && d.seg !== 'none'")
    assert first["seg"] == "shown", first  # the SEG overlay loaded (not "failed")
    count = int(first["count"])
    page.hover("#viewer")
    for _ in range(count // 2):
        page.mouse.wheel(0, 120)  # Cornerstone's stack scroll: one slice per notch
    scrolled = _wait_status(page, f"Number(d.index) !== {first['index']}")
    assert int(scrolled["index"]) > int(first["index"])
    page.keyboard.press("1")  # lung window
    shown = "document.getElementById('viewer-status').textContent"
    lung = _wait_status(page, f"{shown}.includes('W 1500')")
    assert "L -600" in lung["text"]
    _go_to_marker(page, read, ct_row["study_id"])
    page.click("a[data-prior]")
    clicks += 1
    page.wait_for_selector("#prior-viewer canvas", timeout=60_000)
    # Side by side, the current study's canvas follows its narrower box (not stretched, the
    # marker still on its nodule): its backing store matches the element's new width.
    page.wait_for_function(
        "(() => { const el = document.getElementById('viewer'); const c = el.querySelector"
        "('canvas'); return c && Math.abs(c.width - el.clientWidth * devicePixelRatio) <= 2 "
        "&& el.clientWidth < 0.6 * document.querySelector('.viewers').clientWidth; })()",
        timeout=10_000,
    )
    page.screenshot(path=str(SHOTS / "viewer-ru.png"), full_page=True)
    page.click(".finding button[data-act=accept]")
    clicks += 1
    page.click("#impression")
    clicks += 1
    page.keyboard.type("Очаг в правом лёгком, 8 мм. Рекомендован контроль КТ через 6 месяцев.")
    page.click("#sign-final")
    clicks += 1
    page.wait_for_function(
        "document.getElementById('result')?.textContent.includes('final')", timeout=60_000
    )
    seconds = time.monotonic() - t0
    print(f"demo CT read, worklist to signature: {clicks} clicks, {seconds:.1f} s (scripted)")


def _go_to_marker(page: Any, read: str, study_id: int) -> None:
    """Scroll with the arrow keys to the slice of the first nodule marker the study view lists,
    one slice at a time (each step waits for the viewer to show it); the marker is drawn there."""
    markers = page.request.get(f"{read}/api/studies/{study_id}").json()["markers"]
    assert markers, "the CT's AI result has no nodule marker"
    target = markers[0]["sopInstanceUID"]
    status = _status(page)
    for key in ["ArrowDown"] * int(status["count"]) + ["ArrowUp"] * int(status["count"]):
        if status["sop"] == target:
            break
        before = status["index"]
        page.keyboard.press(key)
        if key == "ArrowDown" and int(before) == int(status["count"]) - 1:
            continue  # at the last slice: the rest of the way is up
        status = _wait_status(page, f"d.index !== '{before}'", 10_000)
    assert status["sop"] == target, status
    page.wait_for_selector("#viewer svg circle", timeout=10_000)


def _screens_in(page: Any, lang: str) -> None:
    """The worklist and the remaining radiograph's study view, in ``lang``."""
    rows = page.locator("#worklist tbody tr")
    assert rows.count() == 1
    tag = {"zh": "zh-Hans", "en": "en"}[lang]
    assert page.get_attribute("html", "lang") == tag
    page.screenshot(path=str(SHOTS / f"worklist-{lang}.png"), full_page=True)
    rows.nth(0).click()
    page.wait_for_selector(".finding", timeout=60_000)
    _wait_status(page, "Number(d.count) >= 1")
    if lang == "zh":
        assert page.locator("[lang='zh-Hans']").count() > 0
    page.screenshot(path=str(SHOTS / f"viewer-{lang}.png"), full_page=True)
    page.keyboard.press("Escape")
    page.wait_for_selector("#worklist tbody tr", timeout=30_000)
