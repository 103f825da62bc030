"""Helpers for the PAM system tests (fixtures are in conftest.py beside this file)."""

from __future__ import annotations

import base64
import os
import secrets
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pyotp
import pytest

from devicedb.manage import DeviceManager
from devicedb.models import Context
from devicedb.settings import parse_settings
from devicedb.store import Store

REPO = Path(__file__).resolve().parents[2]
ENTRY_FILE = REPO / "pam_module" / "pam_mfaguard.py"
PAM_PYTHON = "/lib/security/pam_python.so"
PAM_D = Path("/etc/pam.d")
SUDOERS_D = Path("/etc/sudoers.d")


def require(condition: bool, reason: str) -> None:
    """Skip on a developer's machine; fail under CI, where every prerequisite must be there."""
    if condition:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"prerequisite missing under CI=true: {reason}")
    pytest.skip(reason)


def unique(prefix: str) -> str:
    return f"{prefix}{secrets.token_hex(3)}"


def wait_for_fresh_step(margin: float = 5.0, period: int = 30) -> None:
    """Avoid a step boundary between computing a code and its check."""
    left = period - (time.time() % period)
    if left < margin:
        time.sleep(left + 0.2)


@dataclass
class Mfa:
    """A private mfaguard installation: config, key, database, log, in one 0700 folder."""

    root: Path
    extra_yaml: str = ""
    config: Path = field(init=False)
    log: Path = field(init=False)

    def __post_init__(self) -> None:
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        self.config = self.root / "mfaguard.yaml"
        self.log = self.root / "log" / "mfaguard.log"
        self.write_config(self.extra_yaml)
        Store.initialise(self.settings())

    def write_config(self, extra_yaml: str = "") -> None:
        self.config.write_text(
            f"database:\n  path: {self.root}/lib/mfaguard.db\n  key_file: {self.root}/etc/seal.key\n"
            f"logging:\n  file: {self.log}\n{extra_yaml}"
        )
        os.chmod(self.config, 0o600)

    def settings(self):  # type: ignore[no-untyped-def]
        return parse_settings(self.config.read_text(), str(self.config))

    def store(self) -> Store:
        return Store.open(self.settings())

    def enroll(self, user: str) -> bytes:
        secret = secrets.token_bytes(20)
        with self.store() as store:
            DeviceManager(store).enroll_totp(user, Context(service="test"), secret=secret, pending=False)
        return secret

    def audit(self, user: str | None = None) -> list:  # type: ignore[type-arg]
        with self.store() as store:
            return store.audit_rows(user=user)

    def pam_line(self, kind: str, control: str = "required", options: str = "") -> str:
        return f"{kind} {control} {PAM_PYTHON} {ENTRY_FILE} config={self.config} venv={sys.prefix} log={self.log}" + (
            f" {options}" if options else ""
        )


def totp_code(secret: bytes, offset_steps: int = 0) -> str:
    totp = pyotp.TOTP(base64.b32encode(secret).decode())
    return totp.at(time.time() + 30 * offset_steps)


@dataclass(frozen=True)
class SystemUser:
    name: str
    password: str
    home: Path


@dataclass
class PamResult:
    rc: int
    out: str
    err: str

    @property
    def text(self) -> str:
        return self.out + self.err


def pamtester(
    service: str, user: str, answers: list[str], *operations: str, env: dict[str, str] | None = None
) -> PamResult:
    """Run pamtester; each answer is one line on its stdin (one per prompt). ``env``: its environment
    (default: this process's)."""
    stdin = "".join(a + "\n" for a in answers)
    r = subprocess.run(
        ["pamtester", "-v", service, user, *(operations or ("authenticate",))],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    return PamResult(r.returncode, r.stdout, r.stderr)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
