"""``ctzoo pacs``: the PACS bridge — new CT series in, zoo models, DICOM SR/SEG back (:mod:`ctzoo.pacs.core`)."""

from __future__ import annotations

import datetime
import json
import logging
import signal
import threading
from pathlib import Path

import click

from ctzoo.cli.decode_options import resolve_decoder
from ctzoo.config import ConfigError

CONFIG = click.argument("config", type=click.Path(exists=True, dir_okay=False, path_type=Path))


@click.group()
def pacs() -> None:
    """Wire ctzoo to a PACS: every new CT series is processed once, results go back as DICOM SR and SEG.

    \b
    Two ways in, one config file (see configs/pacs.yaml):
      ctzoo pacs watch CONFIG    poll an Orthanc for stable series, upload the results to it
      ctzoo pacs listen CONFIG   a DICOM C-STORE receiver; results are C-STOREd to a destination AE
    And for the operator:
      ctzoo pacs check CONFIG    can we reach Orthanc / the destination AE with these credentials?
      ctzoo pacs status CONFIG   the jobs of the ledger (state, attempts, reason)
      ctzoo pacs retry CONFIG    put PARKED jobs (or the given ones) back in the queue

    Every series is recorded in a SQLite ledger (STATE_DIR/ledger.sqlite) before anything is done with it; a killed
    bridge resumes where it stopped, failures are retried with backoff and then parked with their reason, and a job
    held up by an outage or a full disk waits without using its attempts. Patient ids are stored and logged only as
    salted hashes. With 'perf: {enabled: true}' in CONFIG every stage of every job is timed and judged for latency
    anomalies (docs/perf.md).
    """


def _load(config_path: Path):
    from ctzoo.pacs.config import load_pacs_config

    try:
        return load_pacs_config(config_path)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc


def _existing_ledger(config):
    """The ledger of ``config`` for a command that reads or changes its jobs: one that none was received into yet
    is not created (an empty one would hide a wrong config behind "0 jobs")."""
    if not config.ledger_path.exists():
        raise click.ClickException(f"no ledger at {config.ledger_path} yet (nothing was received)")
    return _ledger(config)


def _ledger(config):
    from ctzoo.pacs.ledger import Ledger

    if not config.state_dir.exists():
        click.echo(f"creating the state folder {config.state_dir} (ledger, spool, work; state_dir in the config)",
                   err=True)
    config.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)  # the ledger, series and results: private
    r = config.retry
    return Ledger(config.ledger_path, max_attempts=r.max_attempts, backoff_s=r.backoff_s,
                  backoff_factor=r.backoff_factor, lease_s=r.lease_s, max_wait_s=r.max_wait_s)


def _tasks(config):
    from ctzoo.cli.bundles import resolve_bundles
    from ctzoo.inference.backends import resolve_device
    from ctzoo.inference.precision import check_request, choose_precision
    from ctzoo.inference.tasks import model_task

    try:
        check_request(config.precision, config.backend)  # before an ONNX export
    except ValueError as exc:
        raise click.ClickException(f"cannot load the models: {exc}") from exc
    bundles = resolve_bundles(config.models, config.backend)
    tasks = []
    try:
        device = resolve_device(config.device)
        for name in config.models:
            choice = choose_precision(bundles[name], config.precision, config.backend, device)
            click.echo(f"{name}: {config.backend} on {device}, {choice.describe()}", err=True)
            tasks.append(model_task(bundles[name], config.backend, device, score_threshold=config.score_threshold,
                                    threads=config.threads, precision=choice.precision))
    except (KeyError, ValueError, RuntimeError, FileNotFoundError) as exc:
        raise click.ClickException(f"cannot load the models: {exc}") from exc
    return tasks


def _perf_note(settings) -> str:
    return f"; latency anomalies: {settings.perf_store_path}" if settings.perf.enabled else ""


def _run_until_signalled(worker, poll_s: float) -> None:
    """Run the worker loop; SIGTERM/SIGINT finish the job in hand, then stop."""
    stop = threading.Event()

    def request_stop(signum, frame) -> None:
        click.echo(f"{signal.Signals(signum).name}: stopping after the current job", err=True)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, request_stop)
    logging.getLogger("ctzoo.pacs").setLevel(min(logging.getLogger().getEffectiveLevel(), logging.INFO))
    worker.run(poll_s=poll_s, stop=stop)


@pacs.command()
@CONFIG
def watch(config: Path) -> None:
    """Poll Orthanc's /changes for stable series, run the models on each CT series, upload SR/SEG to Orthanc.

    Needs the 'orthanc' section of CONFIG (URL, user; the password from $CTZOO_ORTHANC_PASSWORD or a
    password file). Stop with Ctrl-C or SIGTERM: the job in hand finishes first.
    """
    from ctzoo.pacs.config import worker_name
    from ctzoo.pacs.job_events import perf_monitor
    from ctzoo.pacs.orthanc import OrthancClient, OrthancError
    from ctzoo.pacs.watcher import OrthancWatcher

    settings = _load(config)
    if settings.orthanc is None:
        raise click.ClickException(f"{config}: no 'orthanc' section; 'ctzoo pacs watch' needs one")
    try:
        password = settings.orthanc_password()
    except (ConfigError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc
    tasks = _tasks(settings)
    with OrthancClient(settings.orthanc.url, settings.orthanc.username, password,
                       timeout=settings.orthanc.timeout_s) as client, _ledger(settings) as ledger, \
            perf_monitor(settings) as monitor:
        try:
            client.ping()
        except OrthancError as exc:  # down is fine (we wait for it), refused credentials are not
            if exc.status in (401, 403):
                raise click.ClickException(f"Orthanc refused the credentials ({exc})") from exc
            click.echo(f"warning: {exc}; waiting for Orthanc", err=True)
        watcher = OrthancWatcher(client, ledger, tasks, settings.rules, settings.state_dir / "work",
                                 worker_name(), settings.salt(), limits=settings.limits.resource_limits(),
                                 perf=monitor, decoder=resolve_decoder(settings.decode, settings.device),
                                 min_free_mb=settings.orthanc.min_free_mb, start_from=settings.orthanc.start_from,
                                 stable_age_s=settings.orthanc.stable_age_s)
        click.echo(f"watching {settings.orthanc.url} for CT series; models: {', '.join(settings.models)}; "
                   f"ledger: {settings.ledger_path}{_perf_note(settings)}", err=True)
        try:
            _run_until_signalled(watcher, settings.orthanc.poll_s)
        finally:
            watcher.close()


@pacs.command()
@CONFIG
def listen(config: Path) -> None:
    """Receive series by DICOM C-STORE, run the models on each CT series, C-STORE SR/SEG to the destination.

    Needs the 'listener' section of CONFIG (our AE title and port, the calling AE titles allowed, the
    destination AE). A series is processed once nothing has arrived for it for 'stable_s' seconds.
    """
    from ctzoo.pacs.config import worker_name
    from ctzoo.pacs.job_events import perf_monitor
    from ctzoo.pacs.listener import AEAddress, DicomListener, SpoolUnwritable

    settings = _load(config)
    section = settings.listener
    if section is None:
        raise click.ClickException(f"{config}: no 'listener' section; 'ctzoo pacs listen' needs one")
    tasks = _tasks(settings)
    dest = section.destination
    with _ledger(settings) as ledger, perf_monitor(settings) as monitor:
        try:
            listener = DicomListener(
                ledger, tasks, settings.rules, settings.state_dir / "spool", settings.state_dir / "work",
                worker_name(), settings.salt(), AEAddress(section.ae_title, section.host, section.port),
                AEAddress(dest.ae_title, dest.host, dest.port),
                None if section.allowed_calling_aets == ["*"] else section.allowed_calling_aets, section.stable_s,
                section.min_free_mb, settings.limits.resource_limits(), perf=monitor,
                decoder=resolve_decoder(settings.decode, settings.device))
        except SpoolUnwritable as exc:
            raise click.ClickException(f"{exc}; not listening") from exc
        try:
            listener.start()
        except OSError as exc:
            listener.close()
            raise click.ClickException(f"cannot listen on {section.host}:{section.port}: {exc.strerror}") from exc
        click.echo(f"DICOM listener {section.ae_title} on {section.host}:{listener.port}; results to {dest.ae_title}@"
                   f"{dest.host}:{dest.port}; models: {', '.join(settings.models)}; state: {settings.state_dir}"
                   f"{_perf_note(settings)}", err=True)
        try:
            _run_until_signalled(listener, section.poll_s)
        finally:
            listener.stop()
            listener.close()


@pacs.command()
@CONFIG
def check(config: Path) -> None:
    """Check CONFIG: Orthanc answers with these credentials; the destination AE answers a C-ECHO."""
    settings = _load(config)
    problems = 0
    if settings.orthanc is not None:
        from ctzoo.pacs.orthanc import OrthancClient, OrthancError

        try:
            with OrthancClient(settings.orthanc.url, settings.orthanc.username, settings.orthanc_password(),
                               timeout=10) as client:
                system = client.ping()
            click.echo(f"orthanc: ok ({system.get('Name', '?')}, Orthanc {system.get('Version', '?')}, "
                       f"AET {system.get('DicomAet', '?')})")
        except (OrthancError, ConfigError, OSError) as exc:
            problems += 1
            click.echo(f"orthanc: FAILED: {exc}")
    if settings.listener is not None:
        from pynetdicom import AE
        from pynetdicom.sop_class import Verification

        from ctzoo.pacs.listener import AEAddress, association_failure

        dest = settings.listener.destination
        destination = AEAddress(dest.ae_title, dest.host, dest.port)
        ae = AE(ae_title=settings.listener.ae_title)
        ae.add_requested_context(Verification)
        ae.acse_timeout = ae.network_timeout = 10
        pynetdicom_log = logging.getLogger("pynetdicom")
        level = pynetdicom_log.level
        pynetdicom_log.setLevel(logging.CRITICAL)  # its connection errors: the line below says what failed
        try:
            assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title)
            established = assoc.is_established
            status = assoc.send_c_echo() if established else None
            if assoc.is_established:
                assoc.release()
        finally:
            pynetdicom_log.setLevel(level)
        if status is not None and int(status.get("Status", -1)) == 0:
            click.echo(f"destination {destination}: C-ECHO ok")
        else:
            problems += 1
            why = "the C-ECHO was not answered" if established else \
                f"association {association_failure(assoc, destination, settings.listener.ae_title)[0]}"
            click.echo(f"destination {destination}: C-ECHO FAILED ({why})")
    if settings.orthanc is None and settings.listener is None:
        raise click.ClickException(f"{config}: neither an 'orthanc' nor a 'listener' section")
    if problems:
        raise SystemExit(1)


def _when(timestamp: float) -> str:
    return datetime.datetime.fromtimestamp(timestamp).isoformat(timespec="seconds") if timestamp else ""


@pacs.command()
@CONFIG
@click.option("--state", type=click.Choice(["PENDING", "RUNNING", "DONE", "FAILED", "WAITING", "PARKED", "SKIPPED"]),
              help="Only jobs in this state.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per job (with the SeriesInstanceUID).")
def status(config: Path, state: str | None, as_json: bool) -> None:
    """List the jobs of the ledger, oldest first, and how many are in each state.

    Series are shown by a short hash of their SeriesInstanceUID (--json gives the UID itself); patients
    only ever appear as salted hashes.
    """
    from ctzoo.pacs.core import series_tag

    settings = _load(config)
    with _existing_ledger(settings) as ledger:
        jobs, counts = ledger.jobs(state), ledger.summary()
    if as_json:
        for job in jobs:
            click.echo(json.dumps({"id": job.id, "state": job.state.value, "series_uid": job.series_uid,
                                   "source": job.source, "attempts": job.attempts, "reason": job.reason,
                                   "result_uids": job.result_uids, "instances": job.instances,
                                   "patient_hash": job.patient_hash,
                                   "created": _when(job.created_at), "updated": _when(job.updated_at)}))
        return
    click.echo(f"{'id':>5}  {'state':<8} {'tries':>5}  {'series':<10}  {'updated':<19}  {'results':>7}  reason")
    for job in jobs:
        click.echo(f"{job.id:>5}  {job.state.value:<8} {job.attempts:>5}  {series_tag(job.series_uid):<10}  "
                   f"{_when(job.updated_at):<19}  {len(job.result_uids):>7}  {job.reason[:80]}")
    click.echo("  ".join(f"{name}: {n}" for name, n in counts.items()))


@pacs.command()
@CONFIG
@click.argument("job_ids", nargs=-1, type=int)
@click.option("--parked", is_flag=True, help="Every PARKED job.")
def retry(config: Path, job_ids: tuple[int, ...], parked: bool) -> None:
    """Put jobs back in the queue (attempts reset): the given JOB_IDS, or with --parked every PARKED job.

    Run it after fixing what made them fail (see 'ctzoo pacs status'); a running bridge picks them up. Any job but
    a PENDING or RUNNING one: a DONE one is processed again (results identical to those sent are stored once). A
    listener job whose instances were removed (it was skipped or done) waits for the series to be sent again: send
    it after the retry. Exits 1 when none of the given JOB_IDS could be queued again.
    """
    from ctzoo.pacs.ledger import JobState
    from ctzoo.pacs.listener import awaits_resend

    if not job_ids and not parked:
        raise click.UsageError("give JOB_IDS or --parked")
    settings = _load(config)
    with _existing_ledger(settings) as ledger:
        if unknown := sorted(set(job_ids) - {job.id for job in ledger.jobs()}):
            raise click.ClickException(f"no job {', '.join(map(str, unknown))} in {settings.ledger_path} (see "
                                       "'ctzoo pacs status'); nothing requeued")
        ids = list(job_ids) + ([job.id for job in ledger.jobs(JobState.PARKED)] if parked else [])
        done = [i for i in ids if ledger.requeue(i)]
        resend = [job.id for job in ledger.jobs() if job.id in done and awaits_resend(settings.state_dir / "spool",
                                                                                         job)]
    click.echo(f"{len(done)} job(s) queued again" + (f"; not requeued (PENDING or RUNNING already): "
                                                    f"{sorted(set(ids) - set(done))}" if len(done) < len(ids) else ""))
    if resend:
        click.echo(f"{resend}: the received instances are no longer in the spool (removed when the job was skipped "
                   "or done); the job waits for the series to be sent again to 'ctzoo pacs listen'")
    if job_ids and not set(job_ids) & set(done):
        raise SystemExit(1)
