"""Typed settings, loaded once at start-up from the environment (``PREIMG_*``).

Tests build ``Settings(...)`` directly; nothing reads ``os.environ`` at import
time. Names follow DFOS where operators know them (``DFO_RAW_DIR`` etc. become
directories under ``data_root``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.bus.tls import TlsFiles
from shared.bus.topology import QueueArguments


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PREIMG_", extra="ignore", frozen=True)

    # --- where data lives -------------------------------------------------
    data_root: Path = Field(Path("preimg-data"), description="Root of raw/, sci/, logs/, work/, cal/, state/")
    delivery_area: Path | None = Field(
        None, description="AOG drops raw files here; delivered paths must lie inside it "
        "(default: <data_root>/incoming)"
    )
    cal_root: Path | None = Field(None, description="$DFO_CAL_DIR (default: <data_root>/cal)")

    # --- broker ---------------------------------------------------------------
    amqp_url: str = "amqp://guest:guest@127.0.0.1:5672/%2F"
    exchange: str = "preimg"
    amqp_ca_file: str | None = Field(None, description="amqps:// and https:// management: the CA that signed the "
                                     "broker's certificate (default: the system's CAs); the host name is verified")
    amqp_cert_file: str | None = Field(None, description="amqps://: client certificate (optional)")
    amqp_key_file: str | None = Field(None, description="amqps://: the client certificate's key")
    heartbeat_s: int = 30
    #: Fixed-delay retry queues; attempts past the last use the last (RabbitMQ expires head-first,
    #: so one queue per delay). With 10 attempts a stage rides out about 7 minutes of outage.
    retry_delays_ms: tuple[int, ...] = (1000, 10000, 60000)
    max_attempts: int = Field(10, ge=1, description="Attempts before a message is dead-lettered")
    queue_type: Literal["classic", "quorum"] = Field(
        "classic", description="Type of preimg's queues: quorum (replicated, for a three-node cluster: what "
        "compose and k8s set) or classic (one node). Classic is the default so that an existing single-node "
        "broker, whose queues are classic, keeps working after an upgrade; a queue's type cannot change in place "
        "(`preimg broker migrate-queues`)")
    delivery_limit: int = Field(
        20, ge=1, description="Quorum queues: deliveries of a message whose consumer dies holding it, before "
        "the message is answered with a RunFailed and dead-lettered")
    lease_wait_limit_s: float = Field(
        4 * 3600.0, gt=0, description="How long a copy of a message may wait for another copy that holds its run "
        "before the waits count as failed attempts")

    # --- service process --------------------------------------------------------
    http_host: str = "0.0.0.0"
    http_port: int = Field(9100, description="Port of /metrics, /healthz and /readyz (0: any free port)")
    shutdown_grace_s: float = 60.0
    recheck_s: float = Field(30.0, gt=0, description="While start-up checks fail, check again this often")
    temp_sweep_interval_s: float = Field(3600.0, gt=0, description="How often a service sweeps stale temporary files")
    temp_max_age_s: float = Field(86400.0, gt=0, description="Temporary files older than this are stale everywhere")

    # --- QC server (S3 in the distributed set-up, a local directory otherwise) ---
    qc_mode: str = Field("local", pattern="^(local|s3)$")
    qc_dir: Path | None = Field(None, description="Local QC server directory (default: <data_root>/qc)")
    qc_public_url: str = Field("", description="Base URL under which the QC server is browsed")
    s3_endpoint_url: str | None = None
    s3_bucket: str = "preimg-qc"
    s3_prefix: str = ""
    s3_access_key_id: str | None = None
    s3_secret_access_key: SecretStr | None = None
    s3_region: str = "us-east-1"
    s3_max_attempts: int = Field(
        5, ge=1, description="Tries per S3 request before the message goes back for a later retry"
    )
    s3_timeout_s: float = Field(10.0, gt=0, description="Connect and read timeout of one S3 request")
    s3_multipart_threshold_mb: int = Field(
        64, ge=1, description="Files of at least this many MiB are uploaded in parts (multipart upload)"
    )
    s3_multipart_chunk_mb: int = Field(
        16, ge=5, description="Size of one part of a multipart upload in MiB (S3's minimum is 5)"
    )
    s3_max_concurrency: int = Field(4, ge=1, description="Parts of one file uploaded at the same time")
    monitor_max_rows: int = Field(
        200, ge=1, description="Most recent executions shown on preimgMonitor.html"
    )
    monitor_page_interval_s: float = Field(
        1.0, ge=0, description="Least time between two rebuilds of an instrument's preimgMonitor.html by the "
        "publisher service; completions meanwhile are shown by the next rebuild"
    )

    # --- notification -------------------------------------------------------------
    smtp_host: str = "127.0.0.1"
    smtp_port: int = 25
    smtp_from: str = "preimg@localhost"
    operator_email: str = ""
    smtp_timeout_s: float = Field(10.0, gt=0, description="Give up on the SMTP server after this long")

    # --- legacy ---------------------------------------------------------------------
    write_executed_flag: bool = Field(False, description="Also write the EXECUTED file for AOG scripts that poll")

    # --- derived ---------------------------------------------------------------------------
    def tls(self) -> TlsFiles:
        return TlsFiles(self.amqp_ca_file, self.amqp_cert_file, self.amqp_key_file)

    def queue_arguments(self) -> QueueArguments:
        return QueueArguments(self.queue_type, self.delivery_limit)

    def delivery_dir(self) -> Path:
        return (self.delivery_area or self.data_root / "incoming").resolve()

    def cal_dir(self) -> Path:
        return (self.cal_root or self.data_root / "cal").resolve()

    def qc_local_dir(self) -> Path:
        return (self.qc_dir or self.data_root / "qc").resolve()

    def run_dirs(self, instrument: str, run_id: str) -> RunDirs:
        root = self.data_root.resolve()
        return RunDirs(
            raw=root / "raw" / instrument / run_id,
            sci=root / "sci" / instrument / run_id,
            logs=root / "logs" / instrument / run_id,
            work=root / "work" / instrument / run_id,
            state=root / "state" / instrument / run_id,
        )


class RunDirs:
    """The directories of one run: DFOS's $DFO_RAW_DIR/$DFO_SCI_DIR/$DFO_LOG_DIR, per run."""

    def __init__(self, raw: Path, sci: Path, logs: Path, work: Path, state: Path):
        self.raw, self.sci, self.logs, self.work, self.state = raw, sci, logs, work, state

    def as_dict(self) -> dict[str, str]:
        return {k: str(v) for k, v in vars(self).items()}
