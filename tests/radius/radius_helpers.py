"""Fixtures for the mfa-radiusd system tests.

Every test talks to a real `mfa-radiusd` subprocess on 127.0.0.1 and a free port, over a real
database in a private (0700) temp folder. Clients are the real ones where they exist
(radclient, radtest, pam_radius_auth through pamtester) and hand-built datagrams for the
malformed and BlastRADIUS cases. Every process, file, PAM service and user created here is
removed by its fixture's finaliser.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyotp
import pytest

from devicedb.manage import DeviceManager
from devicedb.models import Context
from devicedb.settings import parse_settings
from devicedb.store import Store
from radius_server import protocol as p

REPO = Path(__file__).resolve().parents[2]
RADIUSD = [sys.executable, "-m", "radius_server.cli"]
SECRET = "mfaguard-test-secret-0123"
SECRET_B = SECRET.encode()
PASSWORD = "Pw-for-Radius-Test-42"


def need(condition: bool, reason: str) -> None:
    """Skip on a developer machine, fail in CI (CI=true): CI must run every system test."""
    if condition:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason}, and CI=true: this test must run in CI")
    pytest.skip(reason)


def need_root() -> None:
    need(os.geteuid() == 0, "needs root (useradd, /etc/pam.d, reading /etc/shadow through pam_unix)")


def need_binary(name: str) -> str:
    path = shutil.which(name)
    need(path is not None, f"needs {name} (run scripts/setup-env as root)")
    assert path is not None
    return path


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def clear_of_step_boundary(period: int = 30, margin: float = 5.0) -> None:
    """Wait until at least ``margin`` seconds remain in the current TOTP step."""
    while time.time() % period > period - margin:
        time.sleep(0.2)


@dataclass
class Enrolled:
    user: str
    secret: bytes

    def code(self, offset: int = 0) -> str:
        return pyotp.TOTP(base64.b32encode(self.secret).decode()).at(time.time() + offset)

    def wrong(self) -> str:
        valid = {self.code(o) for o in range(-150, 151, 30)}
        return next(c * 6 for c in "0123456789" if c * 6 not in valid)


@dataclass
class Daemon:
    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, needle: str, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if needle in self.text():
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"mfa-radiusd exited with {self.proc.returncode}:\n{self.text()}")
            time.sleep(0.05)
        raise AssertionError(f"mfa-radiusd did not log {needle!r} within {timeout} s:\n{self.text()}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        return self.proc.returncode


@dataclass
class RadiusEnv:
    root: Path
    daemons: list[Daemon] = field(default_factory=list)
    counter: int = 0

    @property
    def db(self) -> Path:
        return self.root / "db" / "mfaguard.db"

    @property
    def key(self) -> Path:
        return self.root / "keys" / "seal.key"

    def config_text(self, radius: dict[str, Any], extra: str = "") -> str:
        base = f"database:\n  path: {json.dumps(str(self.db))}\n  key_file: {json.dumps(str(self.key))}\n"
        base += f"logging:\n  file: {json.dumps(str(self.root / 'log' / 'mfaguard.log'))}\n"
        return base + extra + "radius: " + json.dumps(radius) + "\n"

    def write_config(self, radius: dict[str, Any], extra: str = "", mode: int = 0o600) -> Path:
        self.counter += 1
        path = self.root / f"mfaguard-{self.counter}.yaml"
        path.write_text(self.config_text(radius, extra))
        os.chmod(path, mode)
        if not self.db.exists():
            Store.initialise(parse_settings(self.config_text(radius, extra), str(path)))
        return path

    def store(self) -> Store:
        return Store.open(parse_settings(self.config_text({"clients": []}), "test"))

    def enroll(self, prefix: str = "u", user: str | None = None) -> Enrolled:
        user = user or f"{prefix}{secrets.token_hex(4)}"
        secret = secrets.token_bytes(20)
        with self.store() as store:
            DeviceManager(store).enroll_totp(user, Context(service="test"), secret=secret, pending=False)
        return Enrolled(user, secret)

    def audit(self, user: str | None = None) -> list[dict[str, Any]]:
        with self.store() as store:
            return [r.as_dict() for r in store.audit_rows(user=user, limit=1000)]

    def start(self, config: Path, *, wait: bool = True, port: int | None = None) -> Daemon:
        log = self.root / f"radiusd-{self.counter}-{len(self.daemons)}.log"
        env = dict(os.environ)
        env.pop("MFAGUARD_CONFIG", None)
        fh = open(log, "wb")  # noqa: SIM115 - the daemon owns it until it stops
        proc = subprocess.Popen(
            [*RADIUSD, "--config", str(config)], stdout=fh, stderr=subprocess.STDOUT, cwd=str(REPO), env=env
        )
        fh.close()
        daemon = Daemon(proc, port or 0, log)
        self.daemons.append(daemon)
        if wait:
            daemon.wait_for("listening on")
        return daemon

    def radiusd(
        self,
        clients: list[dict[str, Any]],
        *,
        first_factor: str = "none",
        extra: dict[str, Any] | None = None,
    ) -> Daemon:
        port = free_udp_port()
        radius = {"listen": [f"127.0.0.1:{port}"], "first_factor": first_factor, "clients": clients}
        radius.update(extra or {})
        daemon = self.start(self.write_config(radius), port=port)
        daemon.port = port
        return daemon

    def close(self) -> None:
        for daemon in self.daemons:
            daemon.stop()


def client(mode: str, *, name: str = "local", address: str = "127.0.0.1", **kw: Any) -> dict[str, Any]:
    entry = {"name": name, "address": address, "secret": SECRET, "mode": mode}
    entry.update(kw)
    return entry


@pytest.fixture(scope="module")
def renv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RadiusEnv]:
    root = tmp_path_factory.mktemp("radius")
    os.chmod(root, 0o700)
    env = RadiusEnv(root)
    yield env
    env.close()


# ---------------------------------------------------------------------------
# Hand-built datagrams.


def user_attrs(
    user: str, password: str | bytes, authenticator: bytes, secret: bytes = SECRET_B
) -> list[tuple[int, bytes]]:
    pw = password.encode() if isinstance(password, str) else password
    return [(p.USER_NAME, user.encode()), (p.USER_PASSWORD, p.encode_password(pw, secret, authenticator))]


def access_request(
    user: str,
    password: str | bytes,
    *,
    ident: int | None = None,
    authenticator: bytes | None = None,
    extra: list[tuple[int, bytes]] | None = None,
    ma: bool = True,
    secret: bytes = SECRET_B,
) -> tuple[bytes, bytes]:
    auth = authenticator or os.urandom(16)
    attrs = user_attrs(user, password, auth, secret) + (extra or [])
    ident = secrets.randbelow(256) if ident is None else ident
    return p.build_request(p.ACCESS_REQUEST, ident, auth, secret, attrs, message_authenticator=ma), auth


class UdpClient:
    """One client socket: retransmissions leave from the same source port."""

    def __init__(self, port: int, source: str = "127.0.0.1") -> None:
        self.port = port
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((source, 0))

    def send(self, packet: bytes) -> None:
        self.sock.sendto(packet, ("127.0.0.1", self.port))

    def recv(self, timeout: float = 3.0) -> bytes | None:
        self.sock.settimeout(timeout)
        try:
            data, _ = self.sock.recvfrom(4096)
        except TimeoutError:
            return None
        return data

    def ask(self, packet: bytes, timeout: float = 3.0) -> bytes | None:
        self.send(packet)
        return self.recv(timeout)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def udp() -> Iterator[Any]:
    made: list[UdpClient] = []

    def make(port: int, source: str = "127.0.0.1") -> UdpClient:
        c = UdpClient(port, source)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


def reply_attrs(reply: bytes) -> list[tuple[int, bytes]]:
    out = []
    pos = 20
    while pos < len(reply):
        t, n = reply[pos], reply[pos + 1]
        out.append((t, reply[pos + 2 : pos + n]))
        pos += n
    return out


def check_reply(reply: bytes | None, request: bytes, secret: bytes = SECRET_B) -> int:
    """The reply's code, after checking its Response Authenticator and its first-attribute Message-Authenticator."""
    import hashlib
    import hmac

    assert reply is not None, "no reply"
    assert reply[1] == request[1], "identifier differs"
    assert p.reply_ok(reply, request[4:20], secret), "bad Response Authenticator"
    attrs = reply_attrs(reply)
    assert attrs and attrs[0][0] == p.MESSAGE_AUTHENTICATOR, "Message-Authenticator is not the first attribute"
    zeroed = reply[:4] + request[4:20] + reply[20:22] + bytes(16) + reply[38:]
    assert hmac.compare_digest(hmac.new(secret, zeroed, hashlib.md5).digest(), reply[22:38]), "bad reply MA"
    return reply[0]


def reply_message(reply: bytes) -> str:
    return b"".join(v for t, v in reply_attrs(reply) if t == p.REPLY_MESSAGE).decode()


def state_of(reply: bytes) -> bytes:
    return next(v for t, v in reply_attrs(reply) if t == p.STATE)


# ---------------------------------------------------------------------------
# radclient


def radclient(port: int, attrs: str, command: str = "auth", secret: str = SECRET, timeout: float = 2) -> str:
    exe = need_binary("radclient")
    proc = subprocess.run(
        [exe, "-x", "-r", "1", "-t", str(timeout), f"127.0.0.1:{port}", command, secret],
        input=attrs.encode(),
        capture_output=True,
        timeout=30,
    )
    return proc.stdout.decode(errors="replace") + proc.stderr.decode(errors="replace")


# ---------------------------------------------------------------------------
# A system user and a pam_unix service for the first factor.


@dataclass
class PamUser:
    name: str
    password: str
    service: str


@pytest.fixture(scope="module")
def pam_user() -> Iterator[PamUser]:
    need_root()
    need_binary("useradd")
    tag = secrets.token_hex(3)
    name = f"mfgrrad{tag}"
    service = f"mfaguard-test-ff-{tag}"
    pam_file = Path("/etc/pam.d") / service
    created_user = False
    try:
        subprocess.run(["useradd", "-M", "-s", "/usr/sbin/nologin", name], check=True)
        created_user = True
        subprocess.run(["chpasswd"], input=f"{name}:{PASSWORD}\n".encode(), check=True)
        pam_file.write_text("auth required pam_unix.so nodelay\naccount required pam_unix.so\n")
        yield PamUser(name, PASSWORD, service)
    finally:
        pam_file.unlink(missing_ok=True)
        if created_user:
            subprocess.run(["userdel", "-r", name], capture_output=True)
