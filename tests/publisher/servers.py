"""Real server processes on loopback for the publisher tests: moto (S3) and aiosmtpd."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
VENV_BIN = Path(sys.executable).parent


def _wait_for_port(port: int, process: subprocess.Popen, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server process exited with {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port} after {timeout} s")


class MotoServer:
    """``moto_server`` as a child process; stop() and start() again on the same port.

    moto keeps its buckets in memory: after a restart the bucket is gone, like
    a wiped MinIO; tests recreate it (an operator-provisioned bucket exists).
    """

    def __init__(self, port: int, log: Path):
        self.port = port
        self.log = log
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        exe = VENV_BIN / "moto_server"
        command = [str(exe)] if exe.exists() else [sys.executable, "-m", "moto.server"]
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [*command, "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=log, stderr=subprocess.STDOUT,
            )
        _wait_for_port(self.port, self.process)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.process = None

    def pause(self) -> None:
        """Freeze the process (SIGSTOP): connections hang and time out, state is kept."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def client(self):
        import boto3

        return boto3.session.Session().client(
            "s3", endpoint_url=self.url, aws_access_key_id="testing",
            aws_secret_access_key="testing", region_name="us-east-1",
        )

    def create_bucket(self, name: str) -> None:
        self.client().create_bucket(Bucket=name)


class SmtpServer:
    """aiosmtpd as a child process saving every mail into ``mail_dir``."""

    def __init__(self, port: int, mail_dir: Path, log: Path):
        self.port = port
        self.mail_dir = mail_dir
        self.log = log
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        env = dict(os.environ, PYTHONPATH=str(HERE))
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "aiosmtpd", "-n", "-l", f"127.0.0.1:{self.port}",
                 "-c", "mail_sink.SaveToDir", str(self.mail_dir)],
                stdout=log, stderr=subprocess.STDOUT, env=env,
            )
        _wait_for_port(self.port, self.process)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)
        self.process = None

    def mails(self) -> list[str]:
        if not self.mail_dir.is_dir():
            return []
        return [p.read_text() for p in sorted(self.mail_dir.glob("*.eml"))]
