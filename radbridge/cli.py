"""The ``radbridge`` command line (typer + rich).

This module is the composition root: it is the one place in ``radbridge/`` that reaches the
other packages, and it does so lazily inside commands so importing the core stays light.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from radbridge.errors import ConfigError, RadbridgeError
from radbridge.settings import Settings, load_settings

__all__ = ["app"]

app = typer.Typer(
    help="radbridge: de-identifying DICOM edge + Ray Serve AI reads.", no_args_is_help=True
)
db_app = typer.Typer(help="Database migrations.", no_args_is_help=True)
agreements_app = typer.Typer(help="B2B agreements files.", no_args_is_help=True)
models_app = typer.Typer(help="Model repository.", no_args_is_help=True)
audit_app = typer.Typer(help="The audit trail of a node.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(audit_app, name="audit")
app.add_typer(agreements_app, name="agreements")
app.add_typer(models_app, name="models")
console = Console()


def _settings() -> Settings:
    s = load_settings()
    logging.basicConfig(
        level=s.log_level,
        format="%(name)s: %(message)s",
        handlers=[RichHandler(console=Console(stderr=True), show_path=False)],
    )
    for noisy in ("httpx", "alembic"):  # one line per poll / per migration step is noise
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return s


def _fail(exc: RadbridgeError) -> typer.Exit:
    console.print(f"[bold red]error:[/] {exc}")
    return typer.Exit(code=2)


def _stop_on_signal() -> threading.Event:
    """Install SIGINT/SIGTERM handlers now (before anything listens), return the stop event.

    Installed before the services start, so a signal that arrives the moment a port opens
    still stops them cleanly (exit 0) instead of killing the process mid-write.
    """
    stop = threading.Event()
    _route_signals(stop)
    return stop


def _until_stopped(stop: threading.Event) -> None:
    """Wait for the stop event in slices, never in one untimed wait.

    CPython runs a signal's Python handler in the main thread, between bytecodes; the kernel may
    deliver SIGTERM to any thread, and then nothing interrupts a main thread blocked in an
    untimed ``Event.wait()``: it never runs the handler. A gateway outlived SIGTERM that way
    (py-spy: main thread in ``stop.wait()``, SIGTERM caught, the event never set).
    """
    while not stop.wait(0.25):
        pass


def _route_signals(stop: threading.Event) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())


# -- db ---------------------------------------------------------------------------------------


@db_app.command("upgrade")
def db_upgrade(
    role: Annotated[str, typer.Option(help="edge, center or all")] = "all",
) -> None:
    """Apply the Alembic migrations to the edge and/or center database."""
    from radbridge.db.migrate import upgrade
    from radbridge.db.tables import NODES

    s = _settings()
    if role not in (*NODES, "all"):
        raise typer.BadParameter("role must be edge, center or all")
    urls = dict(zip(NODES, (s.edge_db_url, s.center_db_url), strict=True))  # NODES' order
    for name, url in urls.items():
        if role in (name, "all"):
            upgrade(url, name)
            console.print(f"{name} database at head")


# -- agreements -------------------------------------------------------------------------------


@agreements_app.command("check")
def agreements_check(file: Path) -> None:
    """Validate an agreements file; exits 2 naming the bad field."""
    from radbridge.agreements import load_agreements

    try:
        aset = load_agreements(file)
    except RadbridgeError as exc:
        raise _fail(exc) from None
    table = Table("id", "hospital", "center", "modalities", "AE titles", "transfer basis", "active")
    for a in aset.agreements:
        tb = a.transfer_basis
        table.add_row(
            a.id,
            a.hospital.name,
            a.reading_center.name,
            ",".join(a.modalities),
            ",".join(a.hospital.calling_ae_titles),
            f"{tb.mechanism.value} {tb.reference} (until {tb.valid_until})"
            + (" SUSPENDED" if tb.suspended else ""),
            "yes" if a.may_transfer() else "NO",
        )
    console.print(table)
    console.print(f"[green]{file}: {len(aset.agreements)} agreement(s) valid[/]")


# -- models -----------------------------------------------------------------------------------


@models_app.command("build")
def models_build(
    force: Annotated[
        bool, typer.Option(help="Replace valid installed models (shipped or retrained).")
    ] = False,
    retrain: Annotated[
        bool, typer.Option(help="Train from scratch (minutes) instead of installing the shipped.")
    ] = False,
) -> None:
    """Install the demo models (CXR classifier, CT nodule segmenter): the trained ones shipped
    in models/shipped, or, with --retrain, train, export and verify them here."""
    from models.demo import build_all

    s = _settings()
    steps = Steps()
    try:
        models = build_all(
            s.models_dir, force=force, log=console.print, retrain=retrain, step=steps
        )
    except BaseException:
        steps.finish(ok=False)
        raise
    steps.finish()
    for model in models:
        console.print(f"[green]{model.key} ready at {model.onnx_path}[/]")


@models_app.command("list")
def models_list() -> None:
    """List the validated models of the repository."""
    from models.repository import ModelRepository

    s = _settings()
    table = Table("model", "modalities", "labels", "sha256", "intended use")
    try:
        for m in ModelRepository(s.models_dir).list():
            mf = m.manifest
            table.add_row(
                m.key,
                ",".join(mf.modalities),
                ",".join(lbl.key for lbl in mf.labels),
                mf.sha256[:12],
                mf.intended_use,
            )
    except RadbridgeError as exc:
        raise _fail(exc) from None
    console.print(table)


@models_app.command("validate")
def models_validate() -> None:
    """Validate every model: manifest, sha256, ONNX signature and a validation inference."""
    from models.importer import validation_inference
    from models.repository import ModelRepository

    s = _settings()
    try:
        models = ModelRepository(s.models_dir).list()
        for m in models:
            out = validation_inference(m)
            console.print(
                f"[green]{m.key} valid[/] (validation inference output {list(out.shape)})"
            )
    except RadbridgeError as exc:
        raise _fail(exc) from None
    if not models:
        console.print(f"no models in {s.models_dir}")


@models_app.command("import")
def models_import(
    path: Annotated[Path, typer.Argument(help="The ONNX file.")],
    manifest: Annotated[Path, typer.Option(help="Its manifest (YAML).")],
    force: Annotated[bool, typer.Option(help="Replace an existing name/version.")] = False,
) -> None:
    """Import a hospital's own ONNX model; accepted only after a validation inference."""
    from models.importer import import_model

    s = _settings()
    try:
        model = import_model(s.models_dir, path, manifest, force=force)
    except RadbridgeError as exc:
        raise _fail(exc) from None
    console.print(f"[green]{model.key} imported[/] into {model.onnx_path.parent}")


# -- services ---------------------------------------------------------------------------------


def _ensure_ready(s: Settings, *, edge: bool, center: bool) -> None:
    from radbridge.agreements import load_agreements
    from radbridge.db.migrate import upgrade

    load_agreements(s.agreements_file)  # a bad agreement fails here, in a second, naming it
    if edge:
        upgrade(s.edge_db_url, "edge")
    if center:
        upgrade(s.center_db_url, "center")
        from models.demo import build_all
        from models.repository import ModelRepository

        if not ModelRepository(s.models_dir).list():  # a hospital's own repository is left as is
            console.print("no models yet: installing the shipped demo models")
            build_all(s.models_dir, log=console.print)


gateway_app = typer.Typer(help="The edge gateway.", invoke_without_command=True)
app.add_typer(gateway_app, name="gateway")


@gateway_app.callback()
def gateway(ctx: typer.Context) -> None:
    """Run the edge gateway (DICOM SCP + outbox + /metrics) until interrupted."""
    if ctx.invoked_subcommand is not None:
        return
    from dicom_io.gateway import Gateway

    s = _settings()
    stop = _stop_on_signal()
    try:
        _ensure_ready(s, edge=True, center=False)
        gw = Gateway(s)
        gw.start()
    except RadbridgeError as exc:
        raise _fail(exc) from None
    console.print(f"[green]gateway ready[/] {s.edge.ae_title}@{s.edge.host}:{s.edge.port}")
    _until_stopped(stop)
    gw.stop()


@gateway_app.command("status")
def gateway_status_cmd() -> None:
    """Associations, outbox depth by state, retrying/blocked studies, disk headroom."""
    from dicom_io.gateway_status import gateway_status
    from dicom_io.store import DurableStore
    from radbridge.db.engine import Database
    from radbridge.db.migrate import upgrade

    s = _settings()
    e = s.edge
    upgrade(s.edge_db_url, "edge")
    st = gateway_status(
        Database(s.edge_db_url),
        DurableStore(s.edge_store, min_free_bytes=e.min_free_bytes),
        f"http://{e.metrics_host}:{e.metrics_port}/metrics" if e.metrics_port else None,
    )
    if st.running:
        console.print(f"gateway [green]running[/]: {st.active_associations} association(s) open")
    else:
        console.print("gateway [red]not reachable[/] (its /metrics did not answer)")
    states = ", ".join(f"{k}: {v}" for k, v in sorted(st.studies_by_state.items())) or "none"
    console.print(f"studies by state: {states}")
    headroom = st.free_bytes - st.min_free_bytes
    colour = "green" if headroom > st.min_free_bytes else "red"
    console.print(
        f"disk: [{colour}]{st.free_bytes / 2**30:.1f} GiB free[/], C-STORE refused (0xA700) "
        f"below {st.min_free_bytes / 2**30:.1f} GiB"
    )
    if st.stuck:
        table = Table("row", "agreement", "state", "attempts", "next attempt", "last error")
        for r in st.stuck:
            table.add_row(
                str(r.row_id),
                r.agreement_id,
                r.state,
                str(r.attempts),
                r.next_attempt_at.isoformat(timespec="seconds") if r.next_attempt_at else "-",
                r.last_error or "",
            )
        console.print(table)
    for hospital, persons in sorted(st.persons_this_year.items()):
        console.print(f"persons whose data left this year ({hospital}): {persons} (PIPL ledger)")
    if st.purges_pending:
        console.print(
            f"purge requests to the center (withdrawn consents): {st.purges_pending} pending"
            + (f"; last error: {st.purge_last_error}" if st.purge_last_error else "")
        )
    d = st.deliveries_by_state
    console.print(
        f"results to the PACS: pending {d.get('pending', 0)}, dead {d.get('dead', 0)}, "
        f"delivered {d.get('delivered', 0)}"
    )
    if st.dead_deliveries:
        table = Table(
            "delivery",
            "agreement",
            "version",
            "kind",
            "attempts",
            "last error",
            title="dead deliveries (radbridge gateway resend ID)",
        )
        for dd in st.dead_deliveries:
            table.add_row(
                str(dd.row_id),
                dd.agreement_id,
                str(dd.version),
                dd.kind,
                str(dd.attempts),
                dd.last_error or "",
            )
        console.print(table)


@gateway_app.command("resend")
def gateway_resend_cmd(
    delivery_id: Annotated[int, typer.Argument(help="Delivery id, as `gateway status` shows.")],
) -> None:
    """Send a dead (or delivered) result to the hospital PACS again."""
    from dicom_io.delivery import resend_delivery
    from radbridge.db.engine import Database
    from radbridge.db.migrate import upgrade

    s = _settings()
    upgrade(s.edge_db_url, "edge")
    db = Database(s.edge_db_url)
    try:
        former = resend_delivery(db, delivery_id)
    except RadbridgeError as exc:
        raise _fail(exc) from None
    finally:
        db.dispose()
    if former == "pending":
        console.print(f"delivery {delivery_id} is already queued")
    else:
        console.print(f"[green]delivery {delivery_id} queued again[/] (was {former})")


center_app = typer.Typer(help="The reading center.", invoke_without_command=True)
app.add_typer(center_app, name="center")


@center_app.callback()
def center(ctx: typer.Context) -> None:
    """Run the center (local Ray + Serve application) until interrupted."""
    if ctx.invoked_subcommand is not None:
        return
    from serving.center import start_center, stop_center

    s = _settings()
    stop = _stop_on_signal()
    try:
        _ensure_ready(s, edge=False, center=True)
        start_center(s)
    except RadbridgeError as exc:
        raise _fail(exc) from None
    scheme = "https" if s.center.tls is not None else "http"
    console.print(f"[green]center ready[/] {scheme}://{s.center.host}:{s.center.port}")
    _until_stopped(stop)
    stop_center()


@center_app.command("purge")
def center_purge(
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="List what is due; delete nothing.")
    ] = False,
) -> None:
    """Purge what the agreements' retention says the center keeps no longer (the Api replicas
    also do this every retention_interval_s); each deletion is an audit record."""
    from dicom_io.store import DurableStore
    from radbridge.agreements import load_agreements
    from radbridge.audit import AuditTrail
    from serving import retention

    s = _settings()
    try:
        agreements = load_agreements(s.agreements_file)
        db = _center_db(s)
        try:
            items = retention.run(
                db,
                DurableStore(s.center_store),
                AuditTrail(db, "center"),
                agreements,
                dry_run=dry_run,
            )
        finally:
            db.dispose()
    except RadbridgeError as exc:
        raise _fail(exc) from None
    table = Table(
        "study", "agreement", "what", "reason", "files", "bytes",
        title="due (dry run: nothing deleted)" if dry_run else "purged",
    )  # fmt: skip
    for item in items:
        table.add_row(
            item.study_uid,
            item.agreement_id,
            item.what,
            item.reason,
            str(item.files),
            str(item.bytes),
        )
    console.print(table)


class Steps:
    """A start-up's steps, each on its own line with its time once done; the running one with
    a spinner on a terminal (plain lines elsewhere, e.g. CI logs)."""

    def __init__(self) -> None:
        self._name: str | None = None
        self._t0 = self._start = time.monotonic()
        self._status: Any = None

    def __call__(self, name: str) -> None:
        """``name`` starts; the step before it is done."""
        self._done(ok=True)
        self._name, self._t0 = name, time.monotonic()
        if console.is_terminal:
            self._status = console.status(f"{name}…")
            self._status.start()
        else:
            console.print(f"  {name}…", highlight=False)

    def finish(self, ok: bool = True) -> None:
        self._done(ok)
        if ok:
            console.print(f"[dim]ready in {time.monotonic() - self._start:.1f} s[/]")

    def _done(self, ok: bool) -> None:
        if self._status is not None:
            self._status.stop()
            self._status = None
        if self._name is not None:
            mark = "[green]✓[/]" if ok else "[red]✗[/]"
            took = time.monotonic() - self._t0
            console.print(f"{mark} {self._name} [dim]{took:.1f} s[/]", highlight=False)
        self._name = None


@app.command()
def up() -> None:
    """Run everything on this machine: center (local Ray), edge gateway, SQLite, folder stores."""
    from dicom_io.gateway import Gateway
    from serving.center import start_center, stop_center

    s = _settings()
    stop = _stop_on_signal()
    steps = Steps()
    try:
        steps("agreements, databases, ports")
        _ensure_ready(s, edge=True, center=True)
        _check_edge_ports(s)  # before Ray starts: a taken port is found in a second, not a minute
        start_center(s, step=steps)
        steps("edge gateway")
        gw = Gateway(s)
        gw.start()
        steps.finish()
    except RadbridgeError as exc:
        steps.finish(ok=False)
        raise _fail(exc) from None
    table = Table("component", "address", title=f"radbridge is up (mode: {s.mode})")
    table.add_row("edge DICOM SCP", f"{s.edge.ae_title}@{s.edge.host}:{s.edge.port}")
    table.add_row("edge /metrics", f"http://{s.edge.metrics_host}:{s.edge.metrics_port}/metrics")
    base = s.center_url
    table.add_row("center API", f"{base}/v1/studies/{{study_uid}}/results")
    table.add_row(
        "center /metrics", f"{base}/metrics (bearer: {s.center_trust_file.parent}/operator.token)"
    )
    table.add_row("data", str(s.data_dir))
    console.print(table)
    console.print("try: [bold]radbridge demo[/] (in another shell); Ctrl-C stops")
    sys.stdout.flush()
    _route_signals(stop)  # again: starting Ray may have installed its own handlers
    _until_stopped(stop)
    gw.stop()
    stop_center()


def _check_edge_ports(s: Settings) -> None:
    from serving.center import check_port_free

    e = s.edge
    check_port_free(e.host, e.port, "edge.port")
    if e.metrics_port:
        check_port_free(e.metrics_host, e.metrics_port, "edge.metrics_port")
    if e.stow_port:
        check_port_free(e.host, e.stow_port, "edge.stow_port")
    if e.tls:
        check_port_free(e.host, e.tls.port, "edge.tls.port")


@app.command()
def demo(
    studies: Annotated[int, typer.Option(min=1, max=20)] = 2,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for results.")] = 180.0,
) -> None:
    """Push generated chest radiograph studies to the running gateway and print their results."""
    import tempfile

    from dicom_io.identity_map import lookup_pseudonym
    from dicom_io.scu import send_files
    from models.cxr_dicom import write_cxr_study
    from radbridge.agreements import load_agreements
    from radbridge.contract import center_client
    from radbridge.db.engine import Database

    s = _settings()
    agreement = load_agreements(s.agreements_file).agreements[0]
    calling = agreement.hospital.calling_ae_titles[0]
    samples = [
        ({"cardiomegaly"}, "Zhang^Wei=张^伟", "DEMO-0001"),
        ({"pleural_effusion", "nodule"}, "Li^Na=李^娜", "DEMO-0002"),
        (set(), "Wang^Fang=王^芳", "DEMO-0003"),
        ({"pneumothorax"}, "Liu^Yang=刘^洋", "DEMO-0004"),
    ]
    pending: dict[str, tuple[set[str], str]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(studies):
            findings, name, pid = samples[i % len(samples)]
            files = write_cxr_study(
                Path(tmp) / str(i),
                seed=1000 + i,
                findings=findings,
                patient_name=name,
                patient_id=f"{pid}-{int(time.time())}",
                birth_date="19700101",
            )
            statuses = send_files(files, s.edge.host, s.edge.port, calling, s.edge.ae_title)
            from pydicom import dcmread

            study_uid = str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
            console.print(f"study {i + 1}: C-STORE statuses {[hex(x) for x in statuses]}")
            pending[study_uid] = (findings, f"study {i + 1}")
    edge_db = Database(s.edge_db_url)
    deadline = time.monotonic() + timeout
    done: dict[str, dict] = {}
    # The demo reads the results as this machine's edge does: its key, over checked HTTPS.
    center = center_client(s, timeout_s=10)
    try:
        while pending.keys() - done.keys() and time.monotonic() < deadline:
            for uid in pending.keys() - done.keys():
                pseudo = lookup_pseudonym(edge_db, agreement.id, "uid", uid)
                if pseudo is None:
                    continue
                try:
                    answer = center.study_results(pseudo)
                except RadbridgeError:
                    continue  # not there yet (404) or the center is busy
                if answer["job"]["state"] in ("done", "failed"):
                    done[uid] = answer
            time.sleep(1)
    finally:
        center.close()
    for uid, (truth, label) in pending.items():
        res = done.get(uid)
        if res is None:
            console.print(f"[red]{label}: no result within {timeout:.0f}s[/]")
            continue
        table = Table(
            "finding",
            "en",
            "ru",
            "zh",
            "probability",
            "present",
            title=f"{label} (truth: {', '.join(sorted(truth)) or 'normal'})",
        )
        for r in res["results"]:
            for f in r["findings"]:
                table.add_row(
                    f["label"],
                    f["display"]["en"],
                    f["display"]["ru"],
                    f["display"]["zh"],
                    f"{f['probability']:.3f}",
                    "yes" if f["present"] else "no",
                )
        console.print(table)
        console.print(f"[yellow]{res['notice']}[/]")
    if pending.keys() - done.keys():
        raise typer.Exit(code=1)


if __name__ == "__main__":
    app()


# -- audit --------------------------------------------------------------------------------------

Node = Annotated[str, typer.Option(help="Whose trail: edge or center (each has its database).")]


def _audit_db(s: Settings, node: str) -> tuple[Any, str]:
    """The node's database and its AuditSourceID."""
    from radbridge.db.engine import Database

    if node not in ("edge", "center"):
        raise _fail(ConfigError(f"--node {node!r}: edge or center"))
    url = s.edge_db_url if node == "edge" else s.center_db_url
    source = f"radbridge-edge:{s.edge.id}" if node == "edge" else "radbridge-center"
    return Database(url), source


@audit_app.command("verify")
def audit_verify(node: Node = "edge") -> None:
    """Prove the hash chain; name the first broken record (exit 1) if there is one."""
    from radbridge.audit import verify

    s = _settings()
    db, _ = _audit_db(s, node)
    try:
        count, broken = verify(db)
    finally:
        db.dispose()
    if broken is not None:
        console.print(
            f"[bold red]{node} audit trail broken at record {broken.seq}:[/] {broken.reason}"
        )
        raise typer.Exit(code=1)
    console.print(f"[green]{node} audit trail intact:[/] {count} records")


@audit_app.command("export")
def audit_export(
    node: Node = "edge",
    since: Annotated[
        str | None, typer.Option(help="ISO date or date-time (UTC) of the first record.")
    ] = None,
    agreement: Annotated[str | None, typer.Option(help="Only this agreement's records.")] = None,
    out: Annotated[Path | None, typer.Option(help="File to write (default: stdout).")] = None,
    syslog: Annotated[
        str | None, typer.Option(help="Send as RFC 5424 syslog over UDP to host:port instead.")
    ] = None,
) -> None:
    """Write the trail as DICOM audit messages (PS3.15 A.5 XML) an auditor can read, one per
    record inside <AuditMessages>, or send them to a syslog collector."""
    import socket as socket_mod
    from datetime import UTC, datetime

    from radbridge.audit import records, send_syslog, syslog_message, to_xml

    s = _settings()
    when = None
    if since:
        try:
            when = datetime.fromisoformat(since)
        except ValueError:
            raise _fail(ConfigError(f"--since {since!r}: not an ISO date")) from None
        when = when.replace(tzinfo=UTC) if when.tzinfo is None else when
    db, source = _audit_db(s, node)
    try:
        rows = records(db, since=when, agreement_id=agreement)
        if syslog:
            host = socket_mod.gethostname()
            n = send_syslog((syslog_message(r, source, host) for r in rows), syslog)
            console.print(f"sent {n} audit messages to {syslog}")
            return
        parts = ['<?xml version="1.0" encoding="UTF-8"?>', "<AuditMessages>"]
        parts += [to_xml(r, source) for r in rows]
        parts.append("</AuditMessages>")
        text = "\n".join(parts) + "\n"
    finally:
        db.dispose()
    if out is None:
        sys.stdout.write(text)
    else:
        out.write_text(text, encoding="utf-8")
        console.print(f"wrote {len(parts) - 3} audit messages to {out}")


# -- readers ----------------------------------------------------------------------------------

readers_app = typer.Typer(help="Reader (radiologist) accounts of the reading room.")
app.add_typer(readers_app, name="readers")


def _center_db(s: Settings) -> Any:
    from radbridge.db.engine import Database
    from radbridge.db.migrate import upgrade

    upgrade(s.center_db_url, "center")
    return Database(s.center_db_url)


@readers_app.command("add")
def readers_add(
    username: str,
    observer_id: Annotated[
        str,
        typer.Option(help="What signed reports name: an identifier (e.g. RB-0001), not a name."),
    ],
    center: Annotated[
        str | None,
        typer.Option(help="The reading center (default: the agreements' only one)."),
    ] = None,
    agreement: Annotated[
        list[str] | None, typer.Option(help="Only these agreements (repeatable; default: all).")
    ] = None,
    locale: Annotated[str, typer.Option(help="ru, zh or en")] = "ru",
    password_stdin: Annotated[
        bool, typer.Option(help="Read the password from standard input (for scripts).")
    ] = False,
) -> None:
    """Create a reader account; the password is asked for (or read from stdin)."""
    from radbridge.agreements import load_agreements
    from review.readers import add_reader

    s = _settings()
    try:
        agreements = load_agreements(s.agreements_file)
        centers = sorted({a.reading_center.name for a in agreements.agreements})
        if center is None:
            if len(centers) != 1:
                raise ConfigError(f"--center: one of {', '.join(centers)}")
            center = centers[0]
        elif center not in centers:
            raise ConfigError(f"--center: no agreement names {center!r} (known: {centers})")
        unknown = sorted(set(agreement or []) - {a.id for a in agreements.agreements})
        if unknown:
            raise ConfigError(f"--agreement: unknown {unknown}")
        if password_stdin:
            password = sys.stdin.readline().rstrip("\n")
        else:
            password = typer.prompt("password", hide_input=True, confirmation_prompt=True)
        db = _center_db(s)
        try:
            reader = add_reader(
                db,
                username,
                password,
                center=center,
                observer_id=observer_id,
                agreements=agreement,
                locale=locale,
            )
        finally:
            db.dispose()
    except RadbridgeError as exc:
        raise _fail(exc) from None
    console.print(f"[green]reader {reader.username} added[/] ({center}, {reader.observer_id})")


@readers_app.command("list")
def readers_list() -> None:
    from review.readers import list_readers

    s = _settings()
    db = _center_db(s)
    try:
        table = Table("username", "observer id", "center", "agreements", "locale", "active")
        for r, active in list_readers(db):
            table.add_row(
                r.username,
                r.observer_id,
                r.center,
                ", ".join(sorted(r.agreements)) or "all",
                r.locale,
                "yes" if active else "no",
            )
        console.print(table)
    finally:
        db.dispose()


@readers_app.command("disable")
def readers_disable(username: str) -> None:
    """Disable an account (its sessions end at their next request)."""
    from review.readers import set_active

    s = _settings()
    db = _center_db(s)
    try:
        set_active(db, username, False)
    except RadbridgeError as exc:
        raise _fail(exc) from None
    finally:
        db.dispose()
    console.print(f"reader {username} disabled")


consent_app = typer.Typer(help="Patients' consent to the cross-border read (edge).")
app.add_typer(consent_app, name="consent")

_ISSUER = typer.Option(help="Issuer of Patient ID, when the hospital uses one.")


@contextmanager
def _consent_register(agreement_id: str) -> Iterator[tuple[Any, Any, Any]]:
    """(the agreement, the edge's consent register, the edge's audit trail) for a command;
    the agreements table is synced first, as the gateway does at its start."""
    from dicom_io.consent import ConsentRegister
    from radbridge.agreements import load_agreements
    from radbridge.audit import AuditTrail
    from radbridge.db.agreements import sync_agreements
    from radbridge.db.engine import Database
    from radbridge.db.migrate import upgrade

    s = _settings()
    agreements = load_agreements(s.agreements_file)
    agreement = agreements.get(agreement_id)
    if agreement is None:
        raise ConfigError(f"--agreement: no agreement {agreement_id!r} in {s.agreements_file}")
    upgrade(s.edge_db_url, "edge")
    db = Database(s.edge_db_url)
    try:
        audit = AuditTrail(db, f"edge:{s.edge.id}")
        sync_agreements(db, agreements)
        secret = s.edge.master_secret.get_secret_value()
        yield agreement, ConsentRegister(db, secret, audit), audit
    finally:
        db.dispose()


@consent_app.command("add")
def consent_add(
    patient_id: Annotated[str, typer.Argument(help="The patient's Patient ID (0010,0020).")],
    reference: Annotated[str, typer.Argument(help="The hospital's reference of the consent.")],
    agreement: Annotated[str, typer.Option(help="The agreement the consent covers.")],
    issuer: Annotated[str, _ISSUER] = "",
) -> None:
    """Record a patient's consent (or renew it after a withdrawal)."""
    try:
        with _consent_register(agreement) as (a, register, _):
            register.record(a.id, issuer, patient_id, reference, "cli")
    except RadbridgeError as exc:
        raise _fail(exc) from None
    console.print(f"[green]consent recorded[/] under {agreement}")


@consent_app.command("import")
def consent_import(
    csv_file: Annotated[Path, typer.Argument(help="CSV: patient_id,reference[,issuer]")],
    agreement: Annotated[str, typer.Option(help="The agreement the consents cover.")],
) -> None:
    """Record consents from the hospital's export (a header row is skipped)."""
    import csv

    try:
        rows = list(csv.reader(csv_file.read_text(encoding="utf-8").splitlines()))
    except OSError as exc:
        raise _fail(ConfigError(f"{csv_file}: {exc.strerror}")) from None
    if rows and [c.strip().lower() for c in rows[0][:2]] == ["patient_id", "reference"]:
        rows = rows[1:]
    try:
        # Every row is checked before any is recorded: a bad file records nothing.
        for n, row in enumerate(rows, start=1):
            if len(row) < 2 or not row[0].strip() or not row[1].strip():
                raise ConfigError(f"{csv_file} row {n}: want patient_id,reference[,issuer]")
        with _consent_register(agreement) as (a, register, _):
            for row in rows:
                issuer = row[2] if len(row) > 2 else ""
                register.record(a.id, issuer, row[0], row[1], "import")
    except RadbridgeError as exc:
        raise _fail(exc) from None
    console.print(f"[green]{len(rows)} consents recorded[/] under {agreement}")


@consent_app.command("withdraw")
def consent_withdraw(
    patient_id: Annotated[str, typer.Argument(help="The patient's Patient ID (0010,0020).")],
    agreement: Annotated[str, typer.Option(help="The agreement the consent covered.")],
    issuer: Annotated[str, _ISSUER] = "",
) -> None:
    """Withdraw a patient's consent: nothing more of the patient leaves; studies still at the
    edge are held; the center is asked (by the running gateway) to delete those it holds."""
    from dicom_io.consent import withdraw
    from dicom_io.store import DurableStore

    s = _settings()
    try:
        with _consent_register(agreement) as (a, register, audit):
            held, purges = withdraw(
                register.db, DurableStore(s.edge_store), register, a, issuer, patient_id, audit
            )
    except RadbridgeError as exc:
        raise _fail(exc) from None
    console.print(
        f"[green]consent withdrawn[/] under {agreement}: {held} studies held at the edge, "
        f"{purges} purge requests queued for the center"
    )


ops_app = typer.Typer(help="Operate the center and its edges on Kubernetes (kubectl's config).")
app.add_typer(ops_app, name="ops")

_NAMESPACE = typer.Option(help="Namespace of the RayService and the edges.")
_RAYSERVICE = typer.Option(help="Name of the center's RayService.")
_CONTEXT = typer.Option(help="kubeconfig context (default: the current one, or in-cluster).")


@ops_app.command("status")
def ops_status(
    namespace: Annotated[str, _NAMESPACE] = "radbridge",
    rayservice: Annotated[str, _RAYSERVICE] = "radbridge-center",
    context: Annotated[str | None, _CONTEXT] = None,
) -> None:
    """The RayService and its worker groups, GPU nodes and their use, the edges' outboxes."""
    from serving.kube import connect, status

    try:
        st = status(connect(namespace, context), rayservice)
    except RadbridgeError as exc:
        raise _fail(exc) from None
    apps = ", ".join(f"{a} {s}" for a, s in sorted(st.applications.items())) or "none"
    console.print(f"RayService {st.rayservice}: {st.service_status}; applications: {apps}")
    groups = Table("worker group", "min", "max", "desired", "running", "GPUs/pod")
    for g in st.groups:
        numbers = (g.minimum, g.maximum, g.desired, g.running, g.gpus_per_pod)
        groups.add_row(g.name, *(str(n) for n in numbers))
    console.print(groups)
    nodes = Table("GPU node", "GPUs", "requested")
    for n in st.gpu_nodes:
        nodes.add_row(n.name, str(n.gpus), str(n.requested))
    console.print(nodes)
    edges = Table("edge pod", "phase", "ready", "outbox (studies by state)")
    for e in st.edges:
        outbox = ", ".join(f"{k} {v:g}" for k, v in sorted(e.outbox.items())) or (e.error or "-")
        ready = ("yes" if e.ready else "no") + (", draining" if e.draining else "")
        edges.add_row(e.pod, e.phase, ready, outbox)
    console.print(edges)


@ops_app.command("scale")
def ops_scale(
    group: Annotated[str, typer.Option(help="Worker group (e.g. gpu).")],
    min_replicas: Annotated[int, typer.Option("--min", help="minReplicas")],
    max_replicas: Annotated[int, typer.Option("--max", help="maxReplicas")],
    namespace: Annotated[str, _NAMESPACE] = "radbridge",
    rayservice: Annotated[str, _RAYSERVICE] = "radbridge-center",
    context: Annotated[str | None, _CONTEXT] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the patch only.")] = False,
) -> None:
    """Set a worker group's replica bounds (KubeRay's autoscaler works within them)."""
    import json

    from serving.kube import GROUP, PLURAL, VERSION, connect, scale_patch

    try:
        cluster = connect(namespace, context)
        rs = cluster.custom.get_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, rayservice
        )
        patch = scale_patch(rs, group, min_replicas, max_replicas)
        console.print_json(json.dumps(patch))
        if not dry_run:
            # A JSON patch must say so: the client's default for custom objects is a merge
            # patch, under which the API server would read this list as the whole object.
            cluster.custom.patch_namespaced_custom_object(
                GROUP,
                VERSION,
                namespace,
                PLURAL,
                rayservice,
                patch,
                _content_type="application/json-patch+json",
            )
            console.print(f"[green]{group}: min {min_replicas}, max {max_replicas}[/]")
    except RadbridgeError as exc:
        raise _fail(exc) from None


@ops_app.command("roll-model")
def ops_roll_model(
    model: Annotated[str, typer.Argument(help="Model name, e.g. chest-xray-demo.")],
    version: Annotated[str, typer.Argument(help="The version that is to answer.")],
    old: Annotated[
        str, typer.Option(help="shadow: the old version keeps running beside it; drop: gone.")
    ] = "shadow",
    namespace: Annotated[str, _NAMESPACE] = "radbridge",
    rayservice: Annotated[str, _RAYSERVICE] = "radbridge-center",
    context: Annotated[str | None, _CONTEXT] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the diff only.")] = False,
) -> None:
    """Serve another version of a model: patch the RayService's serveConfigV2 (hot reconfigure,
    no restart); the diff is printed first."""
    from serving.kube import GROUP, PLURAL, VERSION, connect, roll_model

    if old not in ("shadow", "drop"):
        raise _fail(ConfigError("--old: shadow or drop"))
    try:
        cluster = connect(namespace, context)
        rs = cluster.custom.get_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, rayservice
        )
        roll = roll_model(rs, model, version, old)  # type: ignore[arg-type]
        console.print(roll.diff, markup=False, highlight=False)
        if not dry_run:
            cluster.custom.patch_namespaced_custom_object(
                GROUP,
                VERSION,
                namespace,
                PLURAL,
                rayservice,
                roll.patch,
                _content_type="application/merge-patch+json",
            )
            console.print(f"[green]{model}: {roll.before or 'newest'} -> {roll.after}[/]")
    except RadbridgeError as exc:
        raise _fail(exc) from None


_EDGE_POD = typer.Argument(help="The edge gateway's pod (kubectl get pods -l ...component=edge).")
_EDGE_SERVICE = typer.Option(help="The PACS-facing Service of the edge.")


def _outbox_line(outbox: Any) -> str:
    pending = outbox.pending()
    held = outbox.held()
    text = ("pending: " + "; ".join(pending)) if pending else "[green]nothing pending[/]"
    return text + (f" (held, not waited for: {', '.join(held)})" if held else "")


@ops_app.command("drain-edge")
def ops_drain_edge(
    pod: Annotated[str, _EDGE_POD],
    namespace: Annotated[str, _NAMESPACE] = "radbridge",
    context: Annotated[str | None, _CONTEXT] = None,
    service: Annotated[str, _EDGE_SERVICE] = "radbridge-edge",
    timeout: Annotated[
        float, typer.Option(help="Seconds to wait for the outbox to empty.", min=0)
    ] = 1800,
    interval: Annotated[
        float, typer.Option(help="Seconds between two reads of its /metrics.", min=0.01)
    ] = 5,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the patch and the outbox; send nothing.")
    ] = False,
) -> None:
    """Before maintenance: take an edge pod out of its PACS-facing Service (no new
    associations; it keeps its volume and its Deployment), then wait until its outbox is empty:
    no association open, no study to forward, no result to deliver. Exit 0 when drained, 1 when
    --timeout passes first (naming what is pending; run it again to keep waiting). Nothing is
    deleted. `radbridge ops undrain-edge POD` puts the pod back."""
    import json
    from datetime import UTC, datetime

    from serving.kube import (
        DRAINING_SINCE,
        INTAKE_LABEL,
        connect,
        drain_patch,
        patch_pod,
        read_edge,
        read_outbox,
        wait_drained,
    )

    try:
        cluster = connect(namespace, context)
        obj, selector = read_edge(cluster, pod, service)
        patch = drain_patch(obj, selector, datetime.now(UTC))
        if not patch:
            since = (obj["metadata"].get("annotations") or {}).get(DRAINING_SINCE)
            console.print(f"{pod} is already out of Service {service} (since {since or '?'})")
        else:
            console.print_json(json.dumps(patch))
        if dry_run:
            now = _outbox_line(read_outbox(cluster, pod))
            console.print(f"dry run, nothing sent; {pod} now: {now}")
            return
        if patch:
            patch_pod(cluster, pod, patch)
            console.print(
                f"{pod} taken out of Service {service} ({INTAKE_LABEL}=draining): no new "
                "associations reach it; waiting for its outbox"
            )
        shown: list[str] = []

        def progress(outbox: Any) -> None:  # each change, not every read
            line = _outbox_line(outbox)
            if shown[-1:] != [line]:
                console.print(f"{pod}: {line}")
                shown.append(line)

        drained, last = wait_drained(cluster, pod, timeout, interval, progress)
    except RadbridgeError as exc:
        raise _fail(exc) from None
    if not drained:
        console.print(
            f"[bold red]not drained[/] after {timeout:g} s, still pending on {pod}: "
            f"{'; '.join(last.pending())}. It stays out of Service {service}: run drain-edge "
            "again to keep waiting, or `radbridge ops undrain-edge` to put it back."
        )
        raise typer.Exit(code=1)
    held = last.held()
    console.print(
        f"[green]{pod} drained[/]: nothing to forward or deliver"
        + (
            f"; {', '.join(held)} stay on its volume until a person acts "
            "(`radbridge gateway status`)"
            if held
            else ""
        )
    )


@ops_app.command("undrain-edge")
def ops_undrain_edge(
    pod: Annotated[str, _EDGE_POD],
    namespace: Annotated[str, _NAMESPACE] = "radbridge",
    context: Annotated[str | None, _CONTEXT] = None,
    service: Annotated[str, _EDGE_SERVICE] = "radbridge-edge",
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the patch only.")] = False,
) -> None:
    """Put an edge pod that drain-edge took out back into its PACS-facing Service."""
    import json

    from serving.kube import connect, patch_pod, read_edge, undrain_patch

    try:
        cluster = connect(namespace, context)
        obj, _selector = read_edge(cluster, pod, service)
        patch = undrain_patch(obj)
        console.print_json(json.dumps(patch))
        if not dry_run:
            patch_pod(cluster, pod, patch)
            console.print(f"[green]{pod} back in Service {service}[/]: it takes associations")
    except RadbridgeError as exc:
        raise _fail(exc) from None
