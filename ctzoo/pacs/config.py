"""The config file of ``ctzoo pacs`` (``configs/pacs.yaml``) and the bridge parts it builds.

Secrets never sit in the file: the Orthanc password comes from an environment variable or a file readable
only by its owner, and the salt that hashes patient ids from ``$CTZOO_PACS_SALT`` or, when that is unset, a
random salt created once in ``state_dir/salt`` (mode 0600). Relative paths are relative to the config file.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import stat
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator

from ctzoo.config import ConfigError, StrictConfig, load_config
from ctzoo.io.dicom_scan import SeriesRules
from ctzoo.io.limits import DEFAULT_LIMITS, ResourceLimits
from ctzoo.io.privacy import salt_from

__all__ = ["PacsConfig", "load_pacs_config"]

log = logging.getLogger(__name__)
SALT_ENV = "CTZOO_PACS_SALT"
_AE_TITLE = re.compile(r"^[\x21-\x5b\x5d-\x7e][\x20-\x5b\x5d-\x7e]{0,15}$")  # PS3.5: 16 chars, no backslash


def _ae_title(value: str) -> str:
    if not _AE_TITLE.match(value) or value != value.strip():
        raise ValueError(f"{value!r} is not an AE title (1-16 printable characters, no backslash, "
                         "no leading/trailing spaces)")
    return value


class AESettings(StrictConfig):
    """A DICOM application entity the bridge talks to."""

    ae_title: str = Field(description="its AE title")
    host: str = Field("127.0.0.1", description="its host name or address")
    port: int = Field(104, ge=1, le=65535)

    _check_title = field_validator("ae_title")(_ae_title)


class OrthancSettings(StrictConfig):
    """The Orthanc that ``ctzoo pacs watch`` polls and uploads to."""

    url: str = Field("http://127.0.0.1:8042", description="Orthanc's REST API")
    username: str | None = Field(None, description="HTTP basic user (one of Orthanc's RegisteredUsers)")
    password_env: str = Field("CTZOO_ORTHANC_PASSWORD", description="environment variable holding the password")
    password_file: Path | None = Field(None, description="or a file holding it (chmod 600)")
    poll_s: float = Field(2.0, gt=0, description="seconds between polls of /changes when idle")
    timeout_s: float = Field(60.0, gt=0, description="timeout of one HTTP request")
    min_free_mb: float = Field(1024, ge=0, description="a series is downloaded only while this much would stay free "
                                                       "on the work folder's file system (else its job waits)")
    start_from: Literal["beginning", "now"] = Field(
        "beginning", description="where a watcher with no saved position starts: 'beginning' processes the CT "
                                 "series Orthanc already holds too, 'now' only those that arrive from then on")
    stable_age_s: float = Field(60.0, ge=0, description="Orthanc's StableAge: a series Orthanc calls stable without "
                                                        "announcing it (after a restart) is taken this long after its "
                                                        "last instance")

    @model_validator(mode="before")
    @classmethod
    def _no_password_here(cls, data: Any) -> Any:
        if isinstance(data, dict) and "password" in data:  # never echo it
            raise ValueError("orthanc.password: passwords never go in this file: use $CTZOO_ORTHANC_PASSWORD "
                             "(orthanc.password_env) or orthanc.password_file")
        return data

    @model_validator(mode="after")
    def _password_file_needs_a_user(self) -> OrthancSettings:
        if self.password_file is not None and self.username is None:
            raise ValueError("orthanc.password_file is set but orthanc.username is not: set the user the password "
                             "is for")
        return self

    @field_validator("url")
    @classmethod
    def _no_credentials_in_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("not an http(s) URL with a host (e.g. http://127.0.0.1:8042)")
        if "@" in parts.netloc:  # never echo it: it may hold the password
            raise ValueError("holds a user name or password (user:password@host); set orthanc.username and give "
                             "the password in $CTZOO_ORTHANC_PASSWORD (orthanc.password_env) or orthanc.password_file")
        return value


class ListenerSettings(StrictConfig):
    """The C-STORE SCP of ``ctzoo pacs listen`` and where its results go."""

    ae_title: str = Field("CTZOO", description="our AE title")
    host: str = Field("127.0.0.1", description="address to listen on (loopback by default)")
    port: int = Field(11112, ge=0, le=65535)
    allowed_calling_aets: list[str] = Field(
        description="AE titles allowed to send to us; ['*'] accepts any (only on a closed network)")
    stable_s: float = Field(30.0, gt=0, description="a series is complete when nothing arrived for this long")
    destination: AESettings = Field(description="where the SR/SEG results are C-STOREd (the PACS)")
    poll_s: float = Field(1.0, gt=0, description="seconds between looks at the spool")
    min_free_mb: float = Field(1024, ge=0, description="refuse C-STOREs (status 0xA700, out of resources: the "
                                                       "sender keeps the instance and retries) while the spool's "
                                                       "file system has less than this free")

    _check_title = field_validator("ae_title")(_ae_title)

    @field_validator("allowed_calling_aets")
    @classmethod
    def _check_callers(cls, values: list[str]) -> list[str]:
        if not values:
            raise ValueError("list the AE titles that may send (or ['*'] to accept any)")
        return values if values == ["*"] else [_ae_title(v) for v in values]


class RetrySettings(StrictConfig):
    """How failed jobs are retried (see :class:`ctzoo.pacs.ledger.Ledger`)."""

    max_attempts: int = Field(5, ge=1, description="attempts before a job is PARKED")
    backoff_s: float = Field(30.0, ge=0, description="wait after the first failure")
    backoff_factor: float = Field(2.0, ge=1, description="each further failure waits this much longer")
    lease_s: float = Field(600.0, gt=0, description="a job whose worker stopped heart-beating this long is "
                                                    "taken over (heartbeats every lease_s / 3)")
    max_wait_s: float = Field(300.0, ge=0, description="longest wait between tries of a job held up by the far "
                                                       "end or a full disk (WAITING: those tries use no attempt)")


class LimitSettings(StrictConfig):
    """Size limits for every received series, checked from headers before decoding (:mod:`ctzoo.io.limits`)."""

    max_volume_voxels: int = Field(DEFAULT_LIMITS.max_volume_voxels, ge=1,
                                   description="largest series, Rows x Columns x instances (per instance too)")
    max_decoded_mb: float = Field(DEFAULT_LIMITS.max_decoded_mb, gt=0, description="most MiB one input decodes to")
    max_inflate_ratio: float = Field(DEFAULT_LIMITS.max_inflate_ratio, ge=1,
                                     description="most decoded bytes per byte received beyond 64 MiB")

    def resource_limits(self) -> ResourceLimits:
        return ResourceLimits(self.max_volume_voxels, self.max_decoded_mb, self.max_inflate_ratio)


class PerfSettings(StrictConfig):
    """In-situ latency anomaly detection of every job's stages (docs/perf.md, :mod:`ctzoo.pacs.job_events`)."""

    enabled: bool = Field(True, description="time and judge every stage of every job (costs about 1 % of the "
                                            "service's throughput in the benchmark: on by default)")
    algorithm: Literal["hbos", "sstd"] = Field("hbos", description="hbos: per-key histograms; sstd: |t - mean| > "
                                                                    "6 sigma")
    store: Path | None = Field(None, description="the provenance store (SQLite); default state_dir/perf.sqlite, "
                                                 "beside the ledger")
    server: str | None = Field(None, description="a 'ctzoo perf server' URL to judge against the statistics of "
                                                 "every process; its token from $CTZOO_PERF_TOKEN")
    min_samples: int = Field(20, ge=2, description="events a key needs (over every process, with a server) "
                                                   "before any is judged")


class PacsConfig(StrictConfig):
    """Everything ``ctzoo pacs`` needs; see ``configs/pacs.yaml``."""

    state_dir: Path | None = Field(None, description="ledger.sqlite, spool/ (received series), work/ (temporary), "
                                                      "salt; default: default_state_dir(config file)")
    models: list[str] = Field(default_factory=lambda: ["recistnet-mini", "template-seg-abdomen"],
                              min_length=1, description="zoo models run on every accepted series")
    backend: Literal["onnx", "torch"] = "onnx"
    device: str = Field("auto", description="auto, cpu, cuda")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="torch backend: bf16 where it agrees with fp32 on the sample CT (checked at start); "
                            "auto: bf16 on CUDA where the check passes, else fp32 (as ctzoo infer --precision)")
    threads: int | None = Field(None, ge=1, description="model threads (default: all cores)")
    decode: Literal["auto", "gdcm", "nvimgcodec"] = Field(
        "auto", description="how JPEG 2000 series are decoded: GDCM on the CPU, or nvImageCodec in batches on the "
                            "GPU where the sample CT decodes to GDCM's HU (checked at start); auto: nvImageCodec on "
                            "CUDA where installed and the check passes (as ctzoo infer --decode)")
    score_threshold: float | None = Field(None, ge=0, le=1, description="detector: lesions below this are not "
                                          "reported (default: the model's operating point, from its card)")
    rules: SeriesRules = Field(default_factory=lambda: SeriesRules(min_slices=10),
                               description="which series are processed (as configs/series_selection.yaml)")
    retry: RetrySettings = Field(default_factory=RetrySettings)
    limits: LimitSettings = Field(default_factory=LimitSettings)
    orthanc: OrthancSettings | None = None
    listener: ListenerSettings | None = None
    perf: PerfSettings = Field(default_factory=PerfSettings)

    @property
    def ledger_path(self) -> Path:
        return self.state_dir / "ledger.sqlite"

    @property
    def perf_store_path(self) -> Path:
        return self.perf.store if self.perf.store is not None else self.state_dir / "perf.sqlite"

    def orthanc_password(self) -> str | None:
        """The Orthanc password from ``password_file`` or ``$password_env``; None without a username (with a
        warning when ``$password_env`` is set: the password would go unused, and Orthanc answer 401)."""
        settings = self.orthanc
        if settings is None:
            return None
        if settings.username is None:
            if os.environ.get(settings.password_env):
                log.warning("$%s is set but orthanc.username is not: no credentials are sent to Orthanc",
                            settings.password_env)
            return None
        if settings.password_file is not None:
            _warn_if_readable(settings.password_file)
            return settings.password_file.read_text(encoding="utf-8").strip()
        password = os.environ.get(settings.password_env)
        if not password:
            raise ConfigError(f"orthanc.username is set but ${settings.password_env} is empty and no "
                              "orthanc.password_file is given")
        return password

    def salt(self) -> str:
        """The salt of patient-id hashes: ``$CTZOO_PACS_SALT``, else ``state_dir/salt`` (created once)."""
        return salt_from(SALT_ENV, self.state_dir)


def _warn_if_readable(path: Path) -> None:
    if path.stat().st_mode & (stat.S_IRGRP | stat.S_IROTH):
        raise ConfigError(f"{path} is readable by other users; chmod 600 it")


def default_state_dir(config_path: str | Path) -> Path:
    """Where a config without ``state_dir`` keeps its state: in the user's own tree, one folder per config name
    (``$XDG_STATE_HOME/ctzoo/pacs`` for ``pacs.yaml``, ``~/.local/state`` when XDG_STATE_HOME is unset). Never a
    system folder: trying the example config from a checkout must not need root or write into /var."""
    home = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(home) / "ctzoo" / Path(config_path).stem


def load_pacs_config(path: str | Path) -> PacsConfig:
    """Read and check ``path``; relative paths in it are taken relative to the file's folder."""
    path = Path(path)
    config = load_config(path, PacsConfig)
    base = path.resolve().parent
    updates: dict = {"state_dir": base / config.state_dir if config.state_dir is not None
                     else default_state_dir(path)}
    if config.orthanc is not None and config.orthanc.password_file is not None:
        updates["orthanc"] = config.orthanc.model_copy(update={"password_file": base / config.orthanc.password_file})
    if config.perf.store is not None:
        updates["perf"] = config.perf.model_copy(update={"store": base / config.perf.store})
    return config.model_copy(update=updates)


def worker_name() -> str:
    """This process, as the ledger names job holders."""
    return f"{socket.gethostname()}:{os.getpid()}"
