"""A real mosquitto for the MQTT tests: password file + the deploy ACL, on a free local port.

``broker`` (session) serves most tests; ``own_broker`` (function) is one a test may kill and
restart. Every test gets a fresh device identity (``device``): its own user name and so its
own topic prefix ``edge/<device_id>`` under the ACL, so tests never see each other's messages
or retained status.

mosquitto drops privileges to the ``mosquitto`` user when started as root, so its folder
(config, password file, ACL, persistence, log) lives under a fresh world-traversable folder in
/tmp owned by that user (pytest's tmp_path sits under a 0700 folder it could not enter).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

ROOT = Path(__file__).resolve().parents[2]
MOSQUITTO = Path("/usr/sbin/mosquitto")
MOSQUITTO_PASSWD = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
ACL_TEMPLATE = ROOT / "deploy" / "mosquitto" / "acl"
PASSWORD = "s3cret-device-pw"  # noqa: S105 - test broker only
CONTROLLER = "controller"
CONTROLLER_PASSWORD = "s3cret-controller-pw"  # noqa: S105 - test broker only
DEVICE_POOL = 96


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class MosquittoBroker:
    """One mosquitto process on 127.0.0.1:port with auth and the deploy ACL."""

    root: Path
    port: int
    extra_conf: str = ""
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0
    tls_port: int | None = None
    tls_files: dict[str, Path] = field(default_factory=dict)

    @property
    def conf_path(self) -> Path:
        return self.root / "mosquitto.conf"

    def write_config(self, users: dict[str, str], tls: dict[str, Path] | None = None) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "data").mkdir(exist_ok=True)
        passwd = self.root / "passwd"
        passwd.write_text("".join(f"{u}:{p}\n" for u, p in users.items()), encoding="utf-8")
        subprocess.run([MOSQUITTO_PASSWD, "-U", str(passwd)], check=True, capture_output=True)
        shutil.copyfile(ACL_TEMPLATE, self.root / "acl")
        lines = [
            "per_listener_settings false",
            "allow_anonymous false",
            f"password_file {passwd}",
            f"acl_file {self.root / 'acl'}",
            "persistence true",
            f"persistence_location {self.root / 'data'}/",
            "autosave_interval 1",
            "max_queued_messages 0",
            "max_inflight_messages 100",
            f"log_dest file {self.root / 'mosquitto.log'}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            f"pid_file {self.root / 'mosquitto.pid'}",
            f"listener {self.port} 127.0.0.1",
        ]
        if tls is not None:
            self.tls_port = free_port()
            lines += [
                f"listener {self.tls_port} 127.0.0.1",
                f"cafile {tls['ca']}",
                f"certfile {tls['cert']}",
                f"keyfile {tls['key']}",
                "require_certificate true",
                "tls_version tlsv1.2",
            ]
        self.conf_path.write_text("\n".join(lines) + "\n" + self.extra_conf, encoding="utf-8")
        _give_to_mosquitto(self.root)

    def start(self, timeout: float = 10.0) -> None:
        log = (self.root / "stdout.log").open("ab")
        self.proc = subprocess.Popen(
            [str(MOSQUITTO), "-c", str(self.conf_path)], stdout=log, stderr=subprocess.STDOUT
        )
        log.close()
        self.starts += 1
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited: {self.log_tail()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.02)
        raise RuntimeError(f"mosquitto did not accept connections: {self.log_tail()}")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(10)
        self.proc = None

    def restart(self) -> None:
        self.kill(signal.SIGTERM)
        self.start()

    def log_tail(self) -> str:
        text = ""
        for name in ("stdout.log", "mosquitto.log"):
            with contextlib.suppress(OSError):
                text += (self.root / name).read_text(errors="replace")[-2000:]
        return text


def _give_to_mosquitto(root: Path) -> None:
    """mosquitto drops to its own user when run as root: let it read/write its folder."""
    if os.geteuid() != 0:
        return
    try:
        pw = pwd.getpwnam("mosquitto")
    except KeyError:
        return
    root.chmod(0o755)
    for path in [root, *root.rglob("*")]:
        os.chown(path, pw.pw_uid, pw.pw_gid)
    for name in ("passwd", "acl"):
        if (root / name).exists():
            (root / name).chmod(0o600)


def _users() -> dict[str, str]:
    users = {f"dev{i:03d}": PASSWORD for i in range(DEVICE_POOL)}
    users[CONTROLLER] = CONTROLLER_PASSWORD
    return users


@contextlib.contextmanager
def running_broker(extra_conf: str = "", *, tls: bool = False) -> Iterator[MosquittoBroker]:
    """A started broker; with ``tls`` also a TLS listener (client certificates required) whose
    CA and client certificate/key are in ``broker.tls_files``."""
    if not MOSQUITTO.exists():
        pytest.fail("mosquitto is not installed (apt-get install mosquitto; ./bootstrap does)")
    root = Path(tempfile.mkdtemp(prefix="edge-mqtt-"))
    root.chmod(0o755)  # mosquitto (after dropping to its user) must traverse it
    broker = MosquittoBroker(root / "broker", free_port(), extra_conf)
    if tls:
        broker.tls_files = make_tls_material(broker.root / "tls")
    broker.write_config(_users(), broker.tls_files or None)
    broker.start()
    try:
        yield broker
    finally:
        broker.kill(signal.SIGTERM)
        shutil.rmtree(root, ignore_errors=True)


@dataclass
class Received:
    topic: str
    payload: bytes
    retain: bool
    correlation: bytes | None


@dataclass
class Monitor:
    """A controller client (paho, its own loop thread) that records what it receives."""

    client: paho.Client
    messages: list[Received] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    cond: threading.Condition = field(default_factory=threading.Condition)
    subscribed: threading.Event = field(default_factory=threading.Event)

    def on_message(self, _c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        props = getattr(msg, "properties", None)
        corr = getattr(props, "CorrelationData", None) if props is not None else None
        with self.cond:
            self.messages.append(Received(msg.topic, bytes(msg.payload), bool(msg.retain), corr))
            self.cond.notify_all()

    def wait_for(self, predicate: Any, timeout: float = 10.0) -> list[Received]:
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                found = [m for m in self.messages if predicate(m)]
                if found:
                    return found
                left = deadline - time.monotonic()
                if left <= 0:
                    return []
                self.cond.wait(left)

    def wait_count(self, predicate: Any, count: int, timeout: float = 10.0) -> list[Received]:
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                found = [m for m in self.messages if predicate(m)]
                if len(found) >= count or time.monotonic() >= deadline:
                    return found
                self.cond.wait(max(0.0, min(0.2, deadline - time.monotonic())))

    def snapshot(self) -> list[Received]:
        with self.cond:
            return list(self.messages)

    def send(
        self,
        topic: str,
        payload: bytes | str,
        *,
        response_topic: str | None = None,
        correlation: bytes | None = None,
    ) -> None:
        props = None
        if response_topic is not None:
            props = Properties(PacketTypes.PUBLISH)
            props.ResponseTopic = response_topic
            if correlation is not None:
                props.CorrelationData = correlation
        info = self.client.publish(topic, payload, qos=1, properties=props)
        info.wait_for_publish(5)


def open_monitor(
    broker: MosquittoBroker, topic_filter: str, *, persistent: bool = False
) -> Monitor:
    client = paho.Client(
        CallbackAPIVersion.VERSION2,
        client_id=f"monitor-{uuid.uuid4().hex[:10]}",
        protocol=MQTTProtocolVersion.MQTTv5,
    )
    client.username_pw_set(CONTROLLER, CONTROLLER_PASSWORD)
    mon = Monitor(client)
    client.on_message = mon.on_message

    def on_connect(c: paho.Client, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        if not rc.is_failure:
            c.subscribe(topic_filter, qos=1)

    def on_subscribe(_c: Any, _u: Any, _m: Any, _codes: Any, _p: Any) -> None:
        mon.subscribed.set()

    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.reconnect_delay_set(0.05, 0.2)
    props = None
    if persistent:
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
    client.connect("127.0.0.1", broker.port, 30, clean_start=not persistent, properties=props)
    client.loop_start()
    if not mon.subscribed.wait(10):
        client.loop_stop()
        pytest.fail(f"monitor could not subscribe to {topic_filter}: {broker.log_tail()}")
    return mon


def close_monitor(mon: Monitor) -> None:
    mon.client.disconnect()
    mon.client.loop_stop()


def device_settings(broker: MosquittoBroker, device: str, **overrides: Any) -> Any:
    """``MqttSettings`` for ``device`` on ``broker`` with fast test reconnects."""
    from agent.reporting.mqtt import MqttSettings

    values: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": broker.port,
        "device_id": device,
        "client_id": device,
        "prefix": f"edge/{device}",
        "username": device,
        "password": PASSWORD,
        "reconnect_min_s": 0.05,
        "reconnect_max_s": 0.3,
        "connect_timeout_s": 3.0,
    }
    values.update(overrides)
    return MqttSettings(**values)


def make_tls_material(folder: Path) -> dict[str, Path]:
    """A throw-away CA, a server certificate for 127.0.0.1/localhost and a client certificate."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> Path:
        path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.TraditionalOpenSSL,
                serialization.NoEncryption(),
            )
        )
        return path

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(name("edge-test-ca"))
        .issuer_name(name("edge-test-ca"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )

    def leaf(cn: str, san: list[x509.GeneralName] | None) -> tuple[x509.Certificate, Any]:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(name(cn))
            .issuer_name(ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                critical=False,
            )
        )
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return builder.sign(ca_key, hashes.SHA256()), key

    server, server_key = leaf(
        "localhost", [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    )
    client, client_key = leaf("dev-tls", None)
    out = {
        "ca": folder / "ca.crt",
        "cert": folder / "server.crt",
        "key": write_key(server_key, folder / "server.key"),
        "client_cert": folder / "client.crt",
        "client_key": write_key(client_key, folder / "client.key"),
    }
    out["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    out["cert"].write_bytes(server.public_bytes(serialization.Encoding.PEM))
    out["client_cert"].write_bytes(client.public_bytes(serialization.Encoding.PEM))
    return out
