"""A private, throw-away RabbitMQ node for tests that restart "the broker".

``BrokerNode(base_dir).start()`` runs Debian's ``rabbitmq-server`` as a child process with
its own node name (``preimg-<hex>@localhost``), its own AMQP port and Erlang distribution
port (free ports on 127.0.0.1), its own data, log, pid and config files under ``base_dir``,
no plugins (so nothing binds 15672) and its own Erlang cookie in a private ``HOME``.
The machine's broker (rabbit@localhost on 5672), its config in /etc/rabbitmq and its cookie
are never read or touched; only the shared epmd daemon is used.

Measured on the dev VM (2 vCPU, RabbitMQ 3.10.8, Erlang 25, load average 4-7 from other
test runs; wall clock until an AMQP handshake as guest succeeds):

* start() of a fresh node: median 6.0 s (5.6-6.4 s over 4 runs; 7-11.5 s in pytest set-ups
  while other suites ran), half of it RabbitMQ collecting boot steps from all bundled plugins;
* restart() (stop_app + start_app): median 3.2 s (2.2-4.1 s over 12 runs);
* stop(): ~2 s; start() again after stop() (same data, name and ports): median 5.4 s.

Pitfalls this avoids:

* ``/usr/sbin/rabbitmq-server`` and ``/usr/sbin/rabbitmqctl`` are Debian wrappers that, run
  as root, ``su`` to the rabbitmq user with HOME=/var/lib/rabbitmq (that user cannot enter
  pytest's 0700 tmp dirs, and the CLI would pick up the machine node's cookie). The real
  scripts under /usr/lib/rabbitmq/bin are used instead.
* /etc/rabbitmq/rabbitmq-env.conf and rabbitmq.conf (NODENAME=rabbit@localhost, a listener
  on 5672) are read by default; RABBITMQ_CONF_ENV_FILE and RABBITMQ_CONFIG_FILE point at
  private files so they are not.
* The node name is not on beam's command line (3.10 sets it at run time), so a marker
  argument ``-preimg_broker_node <name>`` is added to find the VM in ``ps`` output.
* CLI tools listen for distribution on 35672-35682 by default, shared with every other
  rabbitmqctl on the machine; ours ask the OS for any free port instead.
* If the test process dies, the node gets SIGTERM (``setpriv --pdeathsig TERM`` on the start
  script, whose trap stops the VM), so an aborted run leaves no stray node behind.
"""

from __future__ import annotations

import concurrent.futures
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

import pika
from pika.adapters.utils.connection_workflow import AMQPConnectorException

from tests.ports import free_port

# Set by the shell or CI for the machine's broker; never inherited by the private node.
_FOREIGN_ENV = (
    "NODENAME", "NODE_IP_ADDRESS", "NODE_PORT", "DIST_PORT", "CONFIG_FILE", "CONF_ENV_FILE",
    "ADVANCED_CONFIG_FILE", "MNESIA_BASE", "MNESIA_DIR", "LOG_BASE", "PID_FILE",
    "ENABLED_PLUGINS_FILE", "PLUGINS_DIR", "USE_LONGNAME", "SERVER_ERL_ARGS",
    "SERVER_ADDITIONAL_ERL_ARGS", "SERVER_START_ARGS", "CTL_ERL_ARGS",
)
MARKER_ARG = "-preimg_broker_node"


class BrokerError(RuntimeError):
    """The private node did not start, stop or answer as asked."""


def rabbitmq_scripts_dir() -> Path | None:
    """The directory with the real (non-wrapper) rabbitmq-server and rabbitmqctl, or None."""
    override = os.environ.get("PREIMG_RABBITMQ_SBIN")
    candidates = [Path(override)] if override else []
    candidates.append(Path("/usr/lib/rabbitmq/bin"))  # Debian/Ubuntu package
    found = shutil.which("rabbitmq-server")
    if found:
        candidates.append(Path(found).resolve().parent)
    for cand in candidates:
        server, ctl = cand / "rabbitmq-server", cand / "rabbitmqctl"
        # Debian's wrapper (rabbitmq-script-wrapper) would su to the rabbitmq user: skip it.
        if server.exists() and ctl.exists() and "wrapper" not in server.resolve().name:
            return cand
    return None


def _die_with_parent() -> list[str]:
    """A command prefix that SIGTERMs the start script when the test process dies (its trap
    then stops the VM cleanly); empty where util-linux's setpriv is missing. The kernel sends it
    when the *thread* that forked the script ends, so nodes are forked by :data:`_SPAWNER`."""
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "TERM", "--"] if setpriv else []


#: The one thread that forks broker nodes. It lives as long as the test process: a node (re)started
#: from a short-lived thread (a chaos test's monkey) would otherwise be stopped when that thread ends.
_SPAWNER = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="broker-spawner")


@dataclass
class BrokerNode:
    """One private RabbitMQ node under ``base_dir``; ``start()`` it, ``stop()`` it."""

    base_dir: Path
    name: str = field(default_factory=lambda: f"preimg-{secrets.token_hex(4)}")
    host: str = "localhost"
    amqp_port: int = 0  # 0: a free port is picked at the first start()
    dist_port: int = 0
    timeout: float = 60.0
    #: Plugins to enable, e.g. ("rabbitmq_management",): its listener goes to ``management_port``.
    plugins: tuple[str, ...] = ()
    management_port: int = 0
    #: More rabbitmq.conf lines (e.g. a TLS listener).
    extra_config: str = ""
    #: user:password of ``url`` and the readiness handshake (another user when definitions replace guest).
    credentials: str = "guest:guest"
    proc: subprocess.Popen | None = field(default=None, repr=False)
    beam_pid: int | None = field(default=None, repr=False)
    scripts: Path = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.base_dir = Path(self.base_dir)
        scripts = rabbitmq_scripts_dir()
        if scripts is None:
            raise BrokerError("rabbitmq-server is not installed (apt-get install rabbitmq-server)")
        self.scripts = scripts

    # -- names and paths -------------------------------------------------------------------
    @property
    def node(self) -> str:
        return f"{self.name}@{self.host}"

    @property
    def url(self) -> str:
        return f"amqp://{self.credentials}@127.0.0.1:{self.amqp_port}/%2F"

    @property
    def log_file(self) -> Path:
        return self.base_dir / "log" / f"{self.node}.log"

    @property
    def stdout_file(self) -> Path:
        return self.base_dir / "stdout.log"

    def _prepare(self) -> None:
        if not self.amqp_port:
            self.amqp_port = free_port()
        while not self.dist_port or self.dist_port == self.amqp_port:
            self.dist_port = free_port()
        for sub in ("home", "log", "mnesia"):
            (self.base_dir / sub).mkdir(parents=True, exist_ok=True)
        cookie = self.base_dir / "home" / ".erlang.cookie"
        if not cookie.exists():
            fd = os.open(cookie, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(16).upper())
        if self.plugins and not self.management_port:
            self.management_port = free_port()
        (self.base_dir / "enabled_plugins").write_text(f"[{','.join(self.plugins)}].\n")
        (self.base_dir / "rabbitmq-env.conf").write_text("# private node: nothing from /etc\n")
        (self.base_dir / "rabbitmq.conf").write_text(
            f"listeners.tcp.1 = 127.0.0.1:{self.amqp_port}\n"
            "loopback_users.guest = true\n"
            "log.console = false\n"
            "log.file.level = info\n"
            + (f"management.tcp.ip = 127.0.0.1\nmanagement.tcp.port = {self.management_port}\n"
               if self.plugins else "")
            + self.extra_config
        )

    def env(self) -> dict[str, str]:
        b = self.base_dir
        env = {
            k: v for k, v in os.environ.items()
            if not k.startswith(("RABBITMQ_", "ERL_")) and k not in _FOREIGN_ENV
        }
        env.update(
            HOME=str(b / "home"),  # the private .erlang.cookie, for the node and the CLI
            RABBITMQ_NODENAME=self.node,
            RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
            RABBITMQ_NODE_PORT=str(self.amqp_port),
            RABBITMQ_DIST_PORT=str(self.dist_port),
            RABBITMQ_CONF_ENV_FILE=str(b / "rabbitmq-env.conf"),
            RABBITMQ_CONFIG_FILE=str(b / "rabbitmq.conf"),
            RABBITMQ_ADVANCED_CONFIG_FILE=str(b / "advanced.config"),  # absent on purpose
            RABBITMQ_ENABLED_PLUGINS_FILE=str(b / "enabled_plugins"),
            RABBITMQ_MNESIA_BASE=str(b / "mnesia"),
            RABBITMQ_MNESIA_DIR=str(b / "mnesia" / self.node),
            RABBITMQ_LOG_BASE=str(b / "log"),
            RABBITMQ_PID_FILE=str(b / "beam.pid"),
            RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS=(
                f"-kernel inet_dist_use_interface {{127,0,0,1}} {MARKER_ARG} {self.node}"
            ),
            # CLI tools: any free port for their own distribution listener (not 35672-35682)
            RABBITMQ_CTL_DIST_PORT_MIN="0",
            RABBITMQ_CTL_DIST_PORT_MAX="0",
            RABBITMQ_CTL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}",
            ERL_EPMD_ADDRESS="127.0.0.1",  # only if this node is the one that starts epmd
        )
        return env

    # -- diagnostics -----------------------------------------------------------------------
    def log_tail(self, chars: int = 4000) -> str:
        parts = []
        for path in (self.log_file, self.stdout_file):  # stdout last: boot crashes end there
            if path.exists():
                parts.append(f"--- {path}\n{path.read_text(errors='replace')[-chars:]}")
        return "\n".join(parts) or "(no log written)"

    def _fail(self, what: str) -> BrokerError:
        return BrokerError(f"{what} (node {self.node}, AMQP port {self.amqp_port})\n"
                           f"{self.log_tail()}")

    # -- CLI -------------------------------------------------------------------------------
    def ctl(self, *args: str, timeout: float | None = None, tool: str = "rabbitmqctl",
            check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run ``rabbitmqctl -n <node> ARGS`` (or another CLI ``tool``) against this node."""
        cmd = [str(self.scripts / tool), "-n", self.node, *args]
        res = subprocess.run(cmd, env=self.env(), capture_output=True, text=True, check=False,
                             timeout=timeout or self.timeout, cwd=self.base_dir)
        if check and res.returncode != 0:
            raise BrokerError(f"{' '.join(cmd[1:])} exited with {res.returncode}:\n"
                              f"{res.stdout}{res.stderr}")
        return res

    def ping(self) -> bool:
        return self.ctl("-q", "ping", tool="rabbitmq-diagnostics", check=False).returncode == 0

    def amqp_ready(self) -> bool:
        """True when a full AMQP handshake (as ``credentials``) succeeds."""
        try:
            with socket.create_connection(("127.0.0.1", self.amqp_port), timeout=1):
                pass
        except OSError:
            return False
        params = pika.URLParameters(
            self.url + "?connection_attempts=1&socket_timeout=2&stack_timeout=5")
        try:
            pika.BlockingConnection(params).close()
        except (pika.exceptions.AMQPError, AMQPConnectorException, OSError):
            return False
        return True

    def _wait_amqp(self, what: str) -> None:
        deadline = time.monotonic() + self.timeout
        while True:
            if self.proc is None or self.proc.poll() is not None:
                code = None if self.proc is None else self.proc.returncode
                raise self._fail(f"{what}: the node exited (status {code})")
            if self.amqp_ready():
                return
            if time.monotonic() > deadline:
                raise self._fail(f"{what}: AMQP not accepting connections after {self.timeout} s")
            time.sleep(0.1)

    # -- life cycle ------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> BrokerNode:
        """Start the node (again, with the same data and ports after ``stop()``)."""
        if self.running:
            return self
        first = not self.amqp_port
        for attempt in range(3):
            self._prepare()
            offset = self.stdout_file.stat().st_size if self.stdout_file.exists() else 0
            try:
                self._spawn()
                return self
            except BaseException as exc:
                self.stop()
                if not isinstance(exc, BrokerError):
                    raise
                # a port picked by free_port() may have been taken in between: pick anew
                with open(self.stdout_file, "rb") as f:
                    f.seek(offset)
                    port_taken = b"eaddrinuse" in f.read().lower()
                if not first or attempt == 2 or not port_taken:
                    raise
                self.amqp_port = self.dist_port = 0
        return self  # pragma: no cover

    def _spawn(self) -> None:
        with open(self.stdout_file, "ab") as out:
            self.proc = _SPAWNER.submit(
                subprocess.Popen, [*_die_with_parent(), str(self.scripts / "rabbitmq-server")],
                env=self.env(), cwd=self.base_dir, stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True,
            ).result()
        self._wait_amqp("start")
        self.beam_pid = self._read_beam_pid()

    def stop_app(self) -> None:
        """``rabbitmqctl stop_app``: AMQP goes away, the Erlang VM stays up."""
        self.ctl("stop_app")

    def start_app(self) -> None:
        """``rabbitmqctl start_app``, then wait until AMQP accepts connections again."""
        self.ctl("start_app")
        self._wait_amqp("start_app")

    def restart(self) -> None:
        """Restart the broker application (stop_app + start_app); messages on disk survive."""
        self.stop_app()
        self.start_app()

    def restart_node(self) -> None:
        """Stop the whole Erlang VM and start it again on the same data, name and ports."""
        self.stop()
        self.start()

    def stop(self) -> None:
        """``rabbitmqctl stop``, then make sure no process of this node is left."""
        proc = self.proc
        if proc is None:
            return
        if self.beam_pid is None:  # a start that failed half-way: the VM may have written it
            self.beam_pid = self._read_beam_pid()
        if proc.poll() is None:
            try:
                self.ctl("stop", timeout=30)
            except (BrokerError, subprocess.TimeoutExpired):
                proc.terminate()  # the start script's trap stops the VM
            try:
                proc.wait(timeout=30)  # the script exits only after the VM has
            except subprocess.TimeoutExpired:
                # not reaped yet, so the process group id is still the node's own
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
        # a VM orphaned by a start script that someone else killed
        pid = self.beam_pid
        if pid and self._is_our_beam(pid):
            os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while self._is_our_beam(pid):
                if time.monotonic() > deadline:
                    raise self._fail(f"beam process {pid} survived SIGKILL")
                time.sleep(0.05)
        self.proc = None
        self.beam_pid = None

    def _read_beam_pid(self) -> int | None:
        try:
            return int((self.base_dir / "beam.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    def _is_our_beam(self, pid: int) -> bool:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return False
        return state != "Z" and self.node.encode() in cmdline

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
