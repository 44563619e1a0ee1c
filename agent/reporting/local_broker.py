"""A private mosquitto for ``edge-agent run`` on the embedded defaults.

When the agent runs without a config file (and so without ``[reporting.mqtt]``) it starts a
broker of its own, so the quick start shows the MQTT side too::

    edge-agent run                     # logs: local MQTT broker on 127.0.0.1:PORT ...
    mosquitto_sub -h 127.0.0.1 -p PORT -t 'edge/#' -v

The broker:

- listens on 127.0.0.1 only, on a free port picked at start;
- lets anonymous clients **read** every ``edge/#`` topic and write nothing;
- has two users with random passwords: the agent (user = device_id, writes its own
  ``edge/<device_id>/...`` topics, reads its commands) and ``controller`` (may send commands);
  the controller's password is in ``controller.password`` in the broker folder (mode 0600);
- keeps its config, password files, pid file and log in a fresh folder under the system
  temporary directory (``edge-agent-broker-*``), handed to the ``mosquitto`` user when the agent
  runs as root (mosquitto drops to that user), removed at stop;
- runs in its own session (a Ctrl-C in the terminal reaches the agent, which then stops the
  broker after its clean MQTT disconnect); no persistence.

``<state_dir>/local-broker.json`` records the running broker (pid, config path); a later start
ends a broker left behind by an agent that was killed, after checking via ``/proc`` that the
pid still runs mosquitto with that config.

Passwords are stored the way mosquitto 2 hashes them itself (``$7$``: PBKDF2-HMAC-SHA512, 101
iterations, 12-byte salt), so no ``mosquitto_passwd`` is needed.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

from agent.errors import ReportingError
from agent.mqtt_config import MqttConfig

__all__ = ["CONTROLLER", "LocalBroker", "find_mosquitto", "mosquitto_password_hash"]

_log = logging.getLogger(__name__)

CONTROLLER = "controller"
_SEARCH = ("/usr/sbin", "/usr/local/sbin", "/sbin")
_RECORD = "local-broker.json"
_PBKDF2_ITERATIONS = 101


def find_mosquitto(environ: Mapping[str, str] | None = None) -> Path | None:
    """The mosquitto binary: on ``$PATH``, else in the usual sbin folders; None if absent."""
    env = os.environ if environ is None else environ
    path = env.get("PATH", os.defpath)
    found = shutil.which("mosquitto", path=os.pathsep.join([path, *_SEARCH]))
    return Path(found) if found else None


def mosquitto_password_hash(password: str, salt: bytes | None = None) -> str:
    """A mosquitto 2 password-file hash (``$7$<iterations>$<salt>$<hash>``, base64)."""
    salt = secrets.token_bytes(12) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, _PBKDF2_ITERATIONS, 64)
    salt64 = base64.b64encode(salt).decode()
    return f"$7${_PBKDF2_ITERATIONS}${salt64}${base64.b64encode(digest).decode()}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalBroker:
    """One private mosquitto (see the module docstring); ``start()`` / ``stop()``."""

    def __init__(
        self, binary: Path, *, device_id: str, state_dir: Path, prefix: str = "edge"
    ) -> None:
        self.binary = binary
        self.device_id = device_id
        self.state_dir = state_dir
        self.topic_root = prefix
        self.port = 0
        self.folder: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def controller_password_file(self) -> Path:
        if self.folder is None:
            raise ReportingError("local broker not started")
        return self.folder / "controller.password"

    def mqtt_config(self) -> MqttConfig:
        """``[reporting.mqtt]`` for the agent on this broker (no TLS, commands on)."""
        if self.folder is None:
            raise ReportingError("local broker not started")
        return MqttConfig(
            host="127.0.0.1",
            port=self.port,
            prefix=f"{self.topic_root}/{{device_id}}",
            username=self.device_id,
            password_file=self.folder / "agent.password",
            reconnect_min_s=0.2,
            reconnect_max_s=2.0,
            # a loopback demo broker: telemetry soon after the start (the live view shows it)
            telemetry_interval_s=2.0,
        )

    def start(self, timeout_s: float = 10.0, attempts: int = 3) -> None:
        """Start mosquitto and wait until it accepts connections (``ReportingError`` if not:
        binary unusable, or no free port after ``attempts`` tries)."""
        self._end_leftover()
        last = ""
        for _ in range(attempts):
            self._prepare()
            try:
                if self._launch(timeout_s):
                    self._record()
                    _log.info(
                        "local MQTT broker on 127.0.0.1:%d; watch it with: mosquitto_sub -h "
                        "127.0.0.1 -p %d -t '%s/#' -v (commands: user %s, password in %s)",
                        self.port,
                        self.port,
                        self.topic_root,
                        CONTROLLER,
                        self.controller_password_file,
                    )
                    return
            except OSError as exc:
                last = f"{self.binary} cannot run: {exc.strerror}"
                self._cleanup()
                break
            last = self._log_tail()
            self._cleanup()
        raise ReportingError(f"mosquitto did not start: {last.strip()[-400:] or 'no output'}")

    def stop(self, timeout_s: float = 5.0) -> None:
        """SIGTERM (SIGKILL after ``timeout_s``), then remove the folder and the record."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                _log.warning("local mosquitto (pid %d) ignored SIGTERM; killing it", proc.pid)
                proc.kill()
                proc.wait(timeout_s)
        self._cleanup()
        (self.state_dir / _RECORD).unlink(missing_ok=True)

    # -- internals ----------------------------------------------------------------------

    def _prepare(self) -> None:
        folder = Path(tempfile.mkdtemp(prefix="edge-agent-broker-"))
        self.folder = folder
        self.port = _free_port()
        agent_pw, controller_pw = secrets.token_urlsafe(18), secrets.token_urlsafe(18)
        _write_private(folder / "agent.password", agent_pw + "\n")
        _write_private(folder / "controller.password", controller_pw + "\n")
        passwd = folder / "passwd"
        passwd.write_text(
            f"{self.device_id}:{mosquitto_password_hash(agent_pw)}\n"
            f"{CONTROLLER}:{mosquitto_password_hash(controller_pw)}\n",
            encoding="utf-8",
        )
        root, dev = self.topic_root, self.device_id
        (folder / "acl").write_text(
            "# anonymous clients: read only\n"
            f"topic read {root}/#\n"
            f"user {dev}\n"
            f"topic read {root}/{dev}/cmd/#\n"
            f"topic write {root}/{dev}/#\n"
            f"user {CONTROLLER}\n"
            f"topic read {root}/#\n"
            f"topic write {root}/{dev}/cmd/#\n",
            encoding="utf-8",
        )
        (folder / "mosquitto.conf").write_text(
            "\n".join(
                [
                    "per_listener_settings false",
                    "allow_anonymous true",
                    f"password_file {passwd}",
                    f"acl_file {folder / 'acl'}",
                    "persistence false",
                    f"log_dest file {folder / 'mosquitto.log'}",
                    "log_type error",
                    "log_type warning",
                    "log_type notice",
                    f"pid_file {folder / 'mosquitto.pid'}",
                    f"listener {self.port} 127.0.0.1",
                    "",
                ]
            ),
            encoding="utf-8",
        )
        _give_to_mosquitto(folder)

    def _launch(self, timeout_s: float) -> bool:
        if self.folder is None:  # pragma: no cover - _prepare ran
            return False
        with (self.folder / "stdout.log").open("ab") as out:
            self._proc = subprocess.Popen(
                [str(self.binary), "-c", str(self.folder / "mosquitto.conf")],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                self._proc = None
                return False
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return True
            except OSError:
                time.sleep(0.02)
        self._proc.kill()
        self._proc.wait(5)
        self._proc = None
        return False

    def _log_tail(self) -> str:
        text = ""
        if self.folder is not None:
            for name in ("stdout.log", "mosquitto.log"):
                with contextlib.suppress(OSError):
                    text += (self.folder / name).read_text(errors="replace")[-1000:]
        return text

    def _cleanup(self) -> None:
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)

    def _record(self) -> None:
        if self._proc is None or self.folder is None:  # pragma: no cover - just started
            return
        record = {"pid": self._proc.pid, "config": str(self.folder / "mosquitto.conf")}
        try:
            (self.state_dir / _RECORD).write_text(json.dumps(record) + "\n", encoding="utf-8")
        except OSError as exc:
            _log.warning("could not record the local broker in %s: %s", self.state_dir, exc)

    def _end_leftover(self) -> None:
        """End a broker a killed agent left behind (only if /proc confirms it is ours)."""
        path = self.state_dir / _RECORD
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
            pid, config = int(record["pid"]), str(record["config"])
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError) as exc:
            _log.warning("ignoring unreadable %s: %s", path, exc)
            path.unlink(missing_ok=True)
            return
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            argv = []
        if config.encode() in argv and any(a.endswith(b"mosquitto") for a in argv):
            _log.warning("ending the local mosquitto (pid %d) left by a previous run", pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            shutil.rmtree(Path(config).parent, ignore_errors=True)
        path.unlink(missing_ok=True)


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(text)


def _give_to_mosquitto(folder: Path) -> None:
    """mosquitto started as root drops to the ``mosquitto`` user: let it read its config,
    password file and ACL and write its log and pid file (the plain-text password files stay
    the agent's)."""
    folder.chmod(0o755)
    for name in ("passwd", "acl"):
        (folder / name).chmod(0o600)
    if os.geteuid() != 0:
        return
    try:
        pw = pwd.getpwnam("mosquitto")
    except KeyError:
        return
    for path in (folder, *(folder / n for n in ("passwd", "acl", "mosquitto.conf"))):
        os.chown(path, pw.pw_uid, pw.pw_gid)
