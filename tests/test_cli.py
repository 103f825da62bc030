"""Tests of the `mfa-admin` command, mostly through the real executable in a subprocess.

Each test gets its own configuration, database and key file inside ``tmp_path``.
Quick set-up steps call ``mfa_admin.cli.main`` in-process; the behaviour under test
goes through the installed ``mfa-admin`` executable wherever stdin, the exit status
of the process or signals matter.
"""

from __future__ import annotations

import base64
import datetime as dt
import io
import json
import os
import pwd
import re
import select
import signal
import sqlite3
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import pytest
import yaml

from devicedb.kinds import totp
from devicedb.manage import DeviceManager
from devicedb.models import Context
from devicedb.settings import load_settings
from devicedb.store import Store
from mfa_admin import cli as cli_module

MFA_ADMIN = Path(sys.executable).parent / "mfa-admin"
SUBPROCESS_TIMEOUT = 60

EXIT_OK = 0
EXIT_REJECTED = 1
EXIT_USAGE = 2
EXIT_CONFIG = 3
EXIT_FILES = 4
EXIT_REFUSED = 5
EXIT_INTERRUPTED = 130

BACKUP_CODE_RE = re.compile(r"(?<![\d-])(\d{5}-\d{5})(?![\d-])")
URI_RE = re.compile(r"otpauth://totp/\S+")


# ---------------------------------------------------------------------------
# Helpers


@dataclass
class Run:
    rc: int
    out: str
    err: str

    @property
    def text(self) -> str:
        return self.out + self.err

    def __str__(self) -> str:  # shown by pytest when an assertion on a Run fails
        return f"rc={self.rc}\n--- stdout ---\n{self.out}\n--- stderr ---\n{self.err}"


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


class Cli:
    """One isolated mfaguard installation inside a private temporary folder."""

    def __init__(self, base: Path) -> None:
        base.chmod(0o700)
        self.base = base
        self.config = base / "mfaguard.yaml"
        self.db = base / "lib" / "mfaguard" / "mfaguard.db"
        self.key = base / "etc" / "mfaguard" / "seal.key"
        self.configure()

    # -- configuration ---------------------------------------------------------
    def base_settings(self) -> dict[str, Any]:
        return {
            "database": {"path": str(self.db), "key_file": str(self.key), "synchronous": "normal"},
            "totp": {"window": 1},
        }

    def configure(self, extra: dict[str, Any] | None = None) -> Path:
        data = _deep_merge(self.base_settings(), extra or {})
        self.write_config_text(yaml.safe_dump(data, sort_keys=False))
        return self.config

    def write_config_text(self, text: str, mode: int = 0o644) -> Path:
        self.config.write_text(text, encoding="utf-8")
        self.config.chmod(mode)
        return self.config

    # -- running -----------------------------------------------------------------
    def argv(self, *args: str) -> list[str]:
        return ["--config", str(self.config), *args]

    @staticmethod
    def environ() -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("MFAGUARD_CONFIG", "SUDO_USER")}
        env["PYTHONDONTWRITEBYTECODE"] = "1"
        return env

    def run(self, *args: str, stdin: str = "", config: bool = True) -> Run:
        """The real executable in a subprocess."""
        argv = [str(MFA_ADMIN), *(self.argv(*args) if config else args)]
        proc = subprocess.run(
            argv,
            input=stdin,
            capture_output=True,
            text=True,
            env=self.environ(),
            timeout=SUBPROCESS_TIMEOUT,
            check=False,
        )
        return Run(proc.returncode, proc.stdout, proc.stderr)

    def call(self, *args: str) -> Run:
        """`mfa_admin.cli.main` in this process (fast; never reads stdin here)."""
        out, err = io.StringIO(), io.StringIO()
        rc = cli_module.main(self.argv(*args), out=out, err=err)
        return Run(rc, out.getvalue(), err.getvalue())

    def popen(self, *args: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [str(MFA_ADMIN), *self.argv(*args)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=self.environ(),
        )

    # -- common steps ------------------------------------------------------------
    def init(self) -> Run:
        r = self.call("init")
        assert r.rc == EXIT_OK, r
        return r

    def enroll(self, user: str, *options: str) -> tuple[int, bytes, Run]:
        """Enroll an active TOTP device; returns its id, its secret and the command's result."""
        r = self.call("enroll", "totp", user, "--no-confirm", "--no-qr", *options)
        assert r.rc == EXIT_OK, r
        devices = self.devices(user)
        assert devices, r
        return max(d["id"] for d in devices), secret_of(r.out), r

    def devices(self, user: str | None = None) -> list[dict[str, Any]]:
        r = self.call("devices", "list", *([user] if user is not None else []), "--json")
        assert r.rc == EXIT_OK, r
        return json.loads(r.out)

    def status(self, user: str) -> dict[str, Any]:
        r = self.call("status", user, "--json")
        assert r.rc == EXIT_OK, r
        return json.loads(r.out)

    def audit(self, *args: str) -> list[dict[str, Any]]:
        r = self.call("audit", "show", "--json", *args)
        assert r.rc == EXIT_OK, r
        return json_lines(r.out)

    def sql(self, *statements: str) -> None:
        conn = sqlite3.connect(str(self.db), isolation_level=None)
        try:
            for statement in statements:
                conn.execute(statement)
        finally:
            conn.close()


def json_lines(text: str) -> list[dict[str, Any]]:
    rows = []
    for line in text.splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        assert isinstance(row, dict), line
        rows.append(row)
    return rows


def uri_of(text: str) -> tuple[str, dict[str, str]]:
    m = URI_RE.search(text)
    assert m, f"no otpauth URI in output:\n{text}"
    parts = urlsplit(m.group(0))
    query = {k: v[0] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
    return unquote(parts.path.lstrip("/")), query


def secret_of(text: str) -> bytes:
    _, query = uri_of(text)
    b32 = query["secret"]
    return base64.b32decode(b32 + "=" * (-len(b32) % 8))


def b32(secret: bytes) -> str:
    return base64.b32encode(secret).decode("ascii").rstrip("=")


def code(secret: bytes, step_offset: int = 0, *, digits: int = 6, algorithm: str = "sha1", period: int = 30) -> str:
    """The code ``step_offset`` steps from now. With totp.window 1, offsets 0 and +1 stay valid
    for a whole step after they are computed, so no test needs to wait for a step boundary."""
    return totp.code_at(secret, digits, algorithm, period, time.time() + step_offset * period)


def wrong_codes(secret: bytes, n: int, *, digits: int = 6, algorithm: str = "sha1", period: int = 30) -> list[str]:
    """``n`` well-formed codes that match no step anywhere near now."""
    near = {code(secret, k, digits=digits, algorithm=algorithm, period=period) for k in range(-4, 5)}
    out: list[str] = []
    i = 1
    while len(out) < n:
        candidate = f"{(i * 7919 + 123) % 10**digits:0{digits}d}"
        if candidate not in near and candidate not in out:
            out.append(candidate)
        i += 1
    return out


def events(rows: list[dict[str, Any]]) -> list[str]:
    return [r["event"] for r in rows]


def read_until(proc: subprocess.Popen[bytes], pattern: re.Pattern[bytes], timeout: float = 30) -> bytes:
    """Read the process's stdout until ``pattern`` matches what was read so far."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    buf = b""
    deadline = time.monotonic() + timeout
    while not pattern.search(buf):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            proc.kill()
            raise AssertionError(f"timed out waiting for {pattern.pattern!r}; got {buf!r}")
        ready, _, _ = select.select([fd], [], [], remaining)
        if not ready:
            continue
        chunk = os.read(fd, 4096)
        if not chunk:
            raise AssertionError(f"process ended before {pattern.pattern!r}; got {buf!r}")
        buf += chunk
    return buf


# The confirmation prompt: it follows the secret and ends with ": " (no newline).
PROMPT_RE = re.compile(rb"Secret for manual entry: [A-Z2-7]+\n(?:.*\n)*.*: $")


def login_capable_accounts() -> tuple[set[str], set[str]]:
    """(accounts the report must list, accounts it must leave out), from passwd and /etc/shells."""
    with open("/etc/shells", encoding="utf-8", errors="replace") as f:
        shells = {line.strip() for line in f if line.strip() and not line.startswith("#")}
    listed, left_out = set(), set()
    for entry in pwd.getpwall():
        no_login = os.path.basename(entry.pw_shell) in ("nologin", "false")
        if entry.pw_uid == 0 or (entry.pw_shell in shells and not no_login):
            listed.add(entry.pw_name)
        else:
            left_out.add(entry.pw_name)
    return listed, left_out


# ---------------------------------------------------------------------------
# Fixtures


@pytest.fixture
def mfa(tmp_path: Path) -> Cli:
    """A configured, not yet initialised installation."""
    return Cli(tmp_path)


@pytest.fixture
def ready(mfa: Cli) -> Cli:
    """An initialised installation."""
    mfa.init()
    return mfa


@pytest.fixture
def backdated(ready: Cli) -> Iterator[Cli]:
    """Audit rows written 3 days and 2 hours ago (through the core, with a fake clock)."""
    settings = load_settings(str(ready.config))
    for user, age in (("threedays", 3 * 86400), ("twohours", 2 * 3600)):
        store = Store.open(settings, clock=lambda age=age: time.time() - age)
        try:
            DeviceManager(store).unlock(user, Context(service="test"))
        finally:
            store.close()
    yield ready


# ---------------------------------------------------------------------------
# --help

SUBCOMMANDS = [
    ["init"],
    ["enroll", "totp"],
    ["devices", "list"],
    ["devices", "enable"],
    ["devices", "disable"],
    ["devices", "remove"],
    ["devices", "rename"],
    ["backup-codes", "generate"],
    ["unlock"],
    ["verify"],
    ["status"],
    ["report"],
    ["audit", "show"],
    ["audit", "export"],
    ["audit", "verify"],
]


def _assert_mentions_exit_codes(text: str) -> None:
    assert "exit codes" in text
    for number in ("0", "1", "2", "3", "4", "5", "130"):
        assert re.search(rf"^\s+{number}\s+\S", text, re.MULTILINE), f"exit code {number} not explained"


def test_help_top_level(mfa: Cli) -> None:
    r = mfa.run("--help", config=False)
    assert r.rc == EXIT_OK, r
    assert "usage: mfa-admin" in r.out
    for command in ("init", "enroll", "devices", "backup-codes", "unlock", "verify", "status", "report", "audit"):
        assert command in r.out
    _assert_mentions_exit_codes(r.out)


@pytest.mark.parametrize("command", SUBCOMMANDS, ids=" ".join)
def test_help_every_subcommand(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    # argparse prints help to sys.stdout, not to main()'s `out`.
    rc = cli_module.main([*command, "--help"])
    assert rc == EXIT_OK
    text = capsys.readouterr().out
    assert f"usage: mfa-admin {' '.join(command)}" in text
    _assert_mentions_exit_codes(text)


def test_help_of_a_subcommand_through_the_executable(mfa: Cli) -> None:
    r = mfa.run("enroll", "totp", "--help", config=False)
    assert r.rc == EXIT_OK, r
    assert "--digits" in r.out and "--no-confirm" in r.out
    _assert_mentions_exit_codes(r.out)


def test_unknown_command_is_a_usage_error(mfa: Cli) -> None:
    r = mfa.run("frobnicate")
    assert r.rc == EXIT_USAGE, r
    assert "frobnicate" in r.err


# ---------------------------------------------------------------------------
# init and the configuration file


def test_init_creates_private_files_and_folders(mfa: Cli) -> None:
    r = mfa.run("init")
    assert r.rc == EXIT_OK, r
    for path in (mfa.db, mfa.key):
        st = path.lstat()
        assert stat.S_ISREG(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o600, f"{path} has mode {oct(st.st_mode)}"
        folder = path.parent.lstat()
        assert stat.S_IMODE(folder.st_mode) == 0o700, f"{path.parent} has mode {oct(folder.st_mode)}"
    assert mfa.key.stat().st_size == 32
    assert str(mfa.db) in r.out and str(mfa.key) in r.out
    assert [row["event"] for row in mfa.audit()] == ["init"]


@pytest.mark.slow
def test_init_twice_is_idempotent(mfa: Cli) -> None:
    assert mfa.run("init").rc == EXIT_OK
    key_before = mfa.key.read_bytes()
    device_id, _, _ = mfa.enroll("alice")
    r = mfa.run("init")
    assert r.rc == EXIT_OK, r
    assert mfa.key.read_bytes() == key_before
    assert "kept existing" in r.out
    assert stat.S_IMODE(mfa.key.stat().st_mode) == 0o600
    assert stat.S_IMODE(mfa.db.stat().st_mode) == 0o600
    assert [d["id"] for d in mfa.devices("alice")] == [device_id]
    assert events(mfa.audit()).count("init") == 1
    assert mfa.call("audit", "verify").rc == EXIT_OK


def test_init_refuses_world_writable_config(mfa: Cli) -> None:
    mfa.config.chmod(0o666)
    r = mfa.run("init")
    # The --help epilog files an unsafe settings file under 3; the core raises its
    # unsafe-path error (4). Either is acceptable as long as the message says why.
    assert r.rc in (EXIT_CONFIG, EXIT_FILES), r
    assert str(mfa.config) in r.err
    if r.rc == EXIT_FILES:
        assert "writable" in r.err
    assert not mfa.db.exists() and not mfa.key.exists()


def test_init_unknown_config_key_names_file_line_and_key(mfa: Cli) -> None:
    text = (
        "database:\n"
        f"  path: {mfa.db}\n"
        f"  key_file: {mfa.key}\n"
        "frobnicate: true\n"  # line 4
    )
    mfa.write_config_text(text)
    r = mfa.run("init")
    assert r.rc == EXIT_CONFIG, r
    assert f"{mfa.config}:4: frobnicate: unknown key" in r.err
    assert not mfa.db.exists() and not mfa.key.exists()


def test_unknown_nested_config_key_and_bad_value(mfa: Cli) -> None:
    mfa.write_config_text(f"database:\n  path: {mfa.db}\n  key_file: {mfa.key}\ntotp:\n  windw: 1\n")
    r = mfa.call("init")
    assert r.rc == EXIT_CONFIG, r
    assert f"{mfa.config}:5: totp.windw: unknown key" in r.err
    assert "window" in r.err  # the allowed keys are listed

    mfa.write_config_text(f"database:\n  path: {mfa.db}\n  key_file: {mfa.key}\ntotp:\n  digits: 7\n")
    r = mfa.call("init")
    assert r.rc == EXIT_CONFIG, r
    assert f"{mfa.config}:5: totp.digits" in r.err and "6 or 8" in r.err


def test_missing_config_file_is_a_config_error(mfa: Cli) -> None:
    mfa.config.unlink()
    r = mfa.run("devices", "list")
    assert r.rc == EXIT_CONFIG, r
    assert str(mfa.config) in r.err and "not found" in r.err


def test_symlinked_config_is_refused(mfa: Cli) -> None:
    real = mfa.base / "real.yaml"
    mfa.config.rename(real)
    mfa.config.symlink_to(real)
    r = mfa.call("init")
    assert r.rc in (EXIT_CONFIG, EXIT_FILES), r
    assert "symlink" in r.err and str(mfa.config) in r.err
    assert not mfa.db.exists()


# ---------------------------------------------------------------------------
# Database, key file and schema problems


def test_devices_list_before_init(mfa: Cli) -> None:
    r = mfa.run("devices", "list")
    assert r.rc == EXIT_FILES, r
    assert "mfa-admin init" in r.err
    assert not mfa.db.exists()


def test_key_file_readable_by_others_is_refused(ready: Cli) -> None:
    ready.key.chmod(0o644)
    r = ready.run("devices", "list")
    assert r.rc == EXIT_FILES, r
    assert str(ready.key) in r.err and "chmod 600" in r.err


def test_symlinked_database_is_refused(ready: Cli) -> None:
    real = ready.db.with_name("real.db")
    ready.db.rename(real)
    ready.db.symlink_to(real)
    r = ready.run("devices", "list")
    assert r.rc == EXIT_FILES, r
    assert "symlink" in r.err


def test_schema_newer_than_known(ready: Cli) -> None:
    ready.sql("PRAGMA user_version = 99")
    r = ready.run("devices", "list")
    assert r.rc == EXIT_FILES, r
    assert "newer" in r.err and "99" in r.err
    r = ready.call("init")
    assert r.rc == EXIT_FILES, r
    assert "newer" in r.err


# ---------------------------------------------------------------------------
# Enrollment


@pytest.mark.slow
def test_enroll_no_confirm_then_verify_and_replay(ready: Cli) -> None:
    ready.configure({"issuer": "ACME VPN"})
    r = ready.run("enroll", "totp", "alice", "--no-confirm", "--no-qr")
    assert r.rc == EXIT_OK, r
    label, query = uri_of(r.out)
    assert label == "ACME VPN:alice"
    assert query["issuer"] == "ACME VPN"
    assert query["digits"] == "6"
    assert query["algorithm"] == "SHA1"
    assert query["period"] == "30"
    secret = secret_of(r.out)
    assert len(secret) >= 16

    (device,) = ready.devices("alice")
    assert device["status"] == "active" and device["enabled"] and not device["pending"]
    assert device["kind"] == "totp" and device["user"] == "alice"
    assert "secret" not in device and b32(secret) not in json.dumps(device)

    now = code(secret)
    r = ready.run("verify", "alice", now)
    assert r.rc == EXIT_OK, r
    assert "accepted" in r.out
    r = ready.run("verify", "alice", now)
    assert r.rc == EXIT_REJECTED, r
    assert "replay" in r.text

    # The next step's code, read from stdin with '-'.
    r = ready.run("verify", "alice", "-", stdin=code(secret, 1) + "\n")
    assert r.rc == EXIT_OK, r


@pytest.mark.slow
def test_verify_reads_code_from_stdin_without_argument(ready: Cli) -> None:
    _, secret, _ = ready.enroll("alice")
    r = ready.run("verify", "alice", stdin=code(secret) + "\n")
    assert r.rc == EXIT_OK, r
    r = ready.run("verify", "alice", "-", stdin="")
    assert r.rc == EXIT_USAGE, r  # no code at all is a usage error, not an attempt
    assert "no code given" in r.err


def test_enroll_prints_a_qr_code_by_default(ready: Cli) -> None:
    r = ready.run("enroll", "totp", "alice", "--no-confirm")
    assert r.rc == EXIT_OK, r
    assert "QR" in r.out
    assert len(r.out.splitlines()) > 10  # the terminal rendering
    assert URI_RE.search(r.out)


@pytest.mark.slow
def test_enroll_with_confirmation_correct_code(ready: Cli) -> None:
    proc = ready.popen("enroll", "totp", "alice", "--no-qr")
    head = read_until(proc, PROMPT_RE)
    secret = secret_of(head.decode())
    confirm = code(secret)
    out, err = proc.communicate(input=(confirm + "\n").encode(), timeout=SUBPROCESS_TIMEOUT)
    r = Run(proc.returncode, (head + out).decode(), err.decode())
    assert r.rc == EXIT_OK, r
    (device,) = ready.devices("alice")
    assert device["status"] == "active"
    assert "device_confirmed" in events(ready.audit("--user", "alice"))
    # The confirmation code has been used up.
    r = ready.run("verify", "alice", confirm)
    assert r.rc == EXIT_REJECTED, r
    assert "replay" in r.text


@pytest.mark.slow
def test_enroll_with_three_wrong_codes_discards_the_device(ready: Cli) -> None:
    proc = ready.popen("enroll", "totp", "alice", "--no-qr")
    head = read_until(proc, PROMPT_RE)
    secret = secret_of(head.decode())
    bad = "".join(c + "\n" for c in wrong_codes(secret, 3))
    out, err = proc.communicate(input=bad.encode(), timeout=SUBPROCESS_TIMEOUT)
    r = Run(proc.returncode, (head + out).decode(), err.decode())
    assert r.rc == EXIT_REJECTED, r
    assert "not confirmed" in r.err
    assert ready.devices("alice") == []
    assert ready.devices() == []
    rows = ready.audit("--user", "alice")
    added = [row for row in rows if row["event"] == "device_added"]
    removed = [row for row in rows if row["event"] == "device_removed"]
    assert len(added) == 1 and len(removed) == 1
    assert added[0]["device_id"] == removed[0]["device_id"]
    assert ready.status("alice")["failures"] == 0  # confirmation attempts are not login failures


def test_enroll_with_empty_stdin_discards_the_device(ready: Cli) -> None:
    r = ready.run("enroll", "totp", "alice", "--no-qr", stdin="")
    assert r.rc == EXIT_REJECTED, r
    assert ready.devices() == []
    assert events(ready.audit("--user", "alice")) == ["device_added", "device_removed"]


@pytest.mark.slow
def test_enroll_interrupted_at_the_prompt_discards_the_device(ready: Cli) -> None:
    proc = ready.popen("enroll", "totp", "alice", "--no-qr")
    read_until(proc, PROMPT_RE)
    time.sleep(0.3)  # let input() start waiting
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=SUBPROCESS_TIMEOUT)
    r = Run(proc.returncode, out.decode(), err.decode())
    assert r.rc == EXIT_INTERRUPTED, r
    assert "interrupted" in r.err
    assert ready.devices() == []


@pytest.mark.slow
def test_enroll_hangup_at_the_prompt_discards_the_device(ready: Cli) -> None:
    """A dropped SSH session (SIGHUP) aborts the prompt like Ctrl-C or EOF do: the pending
    device must not stay behind, where it would count against max_devices for good."""
    proc = ready.popen("enroll", "totp", "alice", "--no-qr")
    read_until(proc, PROMPT_RE)
    time.sleep(0.3)
    proc.send_signal(signal.SIGHUP)
    proc.communicate(timeout=SUBPROCESS_TIMEOUT)
    assert proc.returncode != EXIT_OK
    assert ready.devices() == [], "a pending device was left behind after SIGHUP"


@pytest.mark.slow
def test_enroll_options_are_reflected(ready: Cli) -> None:
    r = ready.run(
        "enroll", "totp", "alice", "--no-confirm", "--no-qr", "--digits", "8", "--algorithm", "sha256", "--period", "60"
    )
    assert r.rc == EXIT_OK, r
    _, query = uri_of(r.out)
    assert (query["digits"], query["algorithm"], query["period"]) == ("8", "SHA256", "60")
    (device,) = ready.devices("alice")
    assert (device["digits"], device["algorithm"], device["period"]) == (8, "sha256", 60)
    text = ready.call("devices", "list", "alice")
    assert "8 digits, SHA256, 60s" in text.out
    secret = secret_of(r.out)
    r = ready.run("verify", "alice", code(secret, digits=8, algorithm="sha256", period=60))
    assert r.rc == EXIT_OK, r
    # A 6-digit code from the same secret is not accepted by an 8-digit device.
    r = ready.call("verify", "alice", code(secret, digits=6, algorithm="sha256", period=60))
    assert r.rc == EXIT_REJECTED, r


def test_enroll_config_defaults_apply(ready: Cli) -> None:
    ready.configure({"totp": {"digits": 8, "algorithm": "sha512", "period": 60}})
    _, _, r = ready.enroll("alice")
    _, query = uri_of(r.out)
    assert (query["digits"], query["algorithm"], query["period"]) == ("8", "SHA512", "60")


@pytest.mark.parametrize(
    "option", [["--digits", "7"], ["--algorithm", "md5"], ["--period", "45"], ["--digits", "six"]], ids=" ".join
)
def test_enroll_bad_option_is_a_usage_error(ready: Cli, option: list[str]) -> None:
    r = ready.run("enroll", "totp", "alice", "--no-confirm", "--no-qr", *option)
    assert r.rc == EXIT_USAGE, r
    assert option[0] in r.err
    assert ready.devices() == []


def test_enroll_label_and_bad_label(ready: Cli) -> None:
    ready.enroll("alice", "--label", "Work phone")
    assert ready.devices("alice")[0]["label"] == "Work phone"
    r = ready.call("enroll", "totp", "alice", "--no-confirm", "--no-qr", "--label", "bad\x07label")
    assert r.rc == EXIT_REFUSED, r
    assert "label" in r.err
    assert len(ready.devices("alice")) == 1


def test_device_limit(ready: Cli) -> None:
    for _ in range(8):
        ready.enroll("alice")
    assert len(ready.devices("alice")) == 8
    audit_before = ready.audit()
    r = ready.run("enroll", "totp", "alice", "--no-confirm", "--no-qr")
    assert r.rc == EXIT_REFUSED, r
    assert "maximum" in r.err
    assert URI_RE.search(r.out) is None  # no secret was shown for a device that does not exist
    assert len(ready.devices("alice")) == 8
    assert ready.audit() == audit_before
    # Another user is not affected by alice's limit.
    ready.enroll("bob")


def test_configured_device_limit(ready: Cli) -> None:
    ready.configure({"max_devices": 2})
    ready.enroll("alice")
    ready.enroll("alice")
    r = ready.call("enroll", "totp", "alice", "--no-confirm", "--no-qr")
    assert r.rc == EXIT_REFUSED, r
    assert "max_devices = 2" in r.err
    assert len(ready.devices("alice")) == 2


# ---------------------------------------------------------------------------
# Device management


@pytest.mark.slow
def test_disable_enable_rename_remove(ready: Cli) -> None:
    alice_id, secret, _ = ready.enroll("alice")
    bob_id, _, _ = ready.enroll("bob")

    r = ready.run("devices", "disable", "alice", str(alice_id))
    assert r.rc == EXIT_OK, r
    assert ready.devices("alice")[0]["status"] == "disabled"
    assert ready.devices("bob")[0]["status"] == "active"
    r = ready.run("verify", "alice", code(secret))
    assert r.rc == EXIT_REJECTED, r

    r = ready.run("devices", "enable", "alice", str(alice_id))
    assert r.rc == EXIT_OK, r
    assert ready.devices("alice")[0]["status"] == "active"
    r = ready.run("verify", "alice", code(secret, 1))
    assert r.rc == EXIT_OK, r

    r = ready.run("devices", "rename", "alice", str(alice_id), "Work phone")
    assert r.rc == EXIT_OK, r
    assert ready.devices("alice")[0]["label"] == "Work phone"
    assert ready.devices("bob")[0]["label"] == "TOTP app"

    r = ready.run("devices", "remove", "alice", str(alice_id))
    assert r.rc == EXIT_OK, r
    assert ready.devices("alice") == []
    assert [d["id"] for d in ready.devices("bob")] == [bob_id]

    rows = [row for row in ready.audit("--user", "alice") if row["event"] != "auth"]
    assert all(row["device_id"] == alice_id for row in rows)
    assert events(rows) == ["device_added", "device_disabled", "device_enabled", "device_renamed", "device_removed"]
    auths = [row for row in ready.audit("--user", "alice") if row["event"] == "auth"]
    assert [row["reason"].startswith("accepted") for row in auths] == [False, True]
    renamed = next(row for row in rows if row["event"] == "device_renamed")
    assert renamed["detail"]["old"] == "TOTP app" and renamed["detail"]["new"] == "Work phone"


@pytest.mark.parametrize(
    "action",
    [["enable"], ["disable"], ["remove"], ["rename", "stolen"]],
    ids=lambda a: a[0],
)
def test_device_of_another_user_or_missing_is_refused(ready: Cli, action: list[str]) -> None:
    ready.enroll("alice")
    bob_id, _, _ = ready.enroll("bob")
    ready.call("devices", "disable", "bob", str(bob_id))  # so that `enable` would change something
    bob_before = ready.devices("bob")
    audit_before = ready.audit()
    verb, *rest = action
    for device_id in (str(bob_id), "999"):
        r = ready.call("devices", verb, "alice", device_id, *rest)
        assert r.rc == EXIT_REFUSED, r
        assert device_id in r.err and "alice" in r.err
    assert ready.devices("bob") == bob_before
    assert ready.audit() == audit_before


@pytest.mark.parametrize("bad_id", ["0", "-1", "one"])
def test_device_id_must_be_a_positive_number(ready: Cli, bad_id: str) -> None:
    r = ready.call("devices", "disable", "alice", bad_id)
    assert r.rc == EXIT_USAGE, r


def test_rename_to_an_invalid_label_is_refused(ready: Cli) -> None:
    device_id, _, _ = ready.enroll("alice")
    for label in ("", "   ", "tab\there", "x" * 65):
        r = ready.call("devices", "rename", "alice", str(device_id), label)
        assert r.rc == EXIT_REFUSED, (label, r)
        assert "label" in r.err
    assert ready.devices("alice")[0]["label"] == "TOTP app"


def test_enable_or_disable_twice_is_harmless(ready: Cli) -> None:
    device_id, _, _ = ready.enroll("alice")
    assert ready.call("devices", "enable", "alice", str(device_id)).rc == EXIT_OK
    assert ready.call("devices", "disable", "alice", str(device_id)).rc == EXIT_OK
    r = ready.call("devices", "disable", "alice", str(device_id))
    assert r.rc == EXIT_OK, r
    assert "already" in r.out
    assert events(ready.audit("--user", "alice")) == ["device_added", "device_disabled"]


@pytest.mark.slow
@pytest.mark.parametrize("verb", ["disable", "remove"])
def test_root_keeps_its_last_active_device_unless_forced(ready: Cli, verb: str) -> None:
    root_id, _, _ = ready.enroll("root")
    r = ready.run("devices", verb, "root", str(root_id))
    assert r.rc == EXIT_REFUSED, r
    assert "root" in r.err and "--force" in r.err
    assert [d["status"] for d in ready.devices("root")] == ["active"]

    # With a second active device, the first can go.
    second_id, _, _ = ready.enroll("root")
    r = ready.run("devices", verb, "root", str(root_id))
    assert r.rc == EXIT_OK, r
    r = ready.run("devices", verb, "root", str(second_id))
    assert r.rc == EXIT_REFUSED, r

    r = ready.run("devices", verb, "root", str(second_id), "--force")
    assert r.rc == EXIT_OK, r
    assert not any(d["status"] == "active" for d in ready.devices("root"))


def test_last_device_of_other_user_warns_only(ready: Cli) -> None:
    device_id, _, _ = ready.enroll("alice")
    r = ready.call("devices", "disable", "alice", str(device_id))
    assert r.rc == EXIT_OK, r
    assert "warning" in r.err and "alice" in r.err


# ---------------------------------------------------------------------------
# Backup codes


@pytest.mark.slow
def test_backup_codes(ready: Cli) -> None:
    ready.enroll("alice")
    r = ready.run("backup-codes", "generate", "alice")
    assert r.rc == EXIT_OK, r
    codes = BACKUP_CODE_RE.findall(r.out)
    assert len(codes) == 10 and len(set(codes)) == 10, r
    assert ready.status("alice")["backup_codes_left"] == 10

    r = ready.run("verify", "alice", codes[0])
    assert r.rc == EXIT_OK, r
    r = ready.run("verify", "alice", codes[0])
    assert r.rc == EXIT_REJECTED, r
    assert "replay" in r.text or "used" in r.text
    assert ready.status("alice")["backup_codes_left"] == 9
    # Without the dash as well.
    assert ready.call("verify", "alice", codes[1].replace("-", "")).rc == EXIT_OK
    assert ready.status("alice")["backup_codes_left"] == 8

    r = ready.call("backup-codes", "generate", "alice")
    assert r.rc == EXIT_OK, r
    fresh = BACKUP_CODE_RE.findall(r.out)
    assert len(fresh) == 10 and not set(fresh) & set(codes)
    assert ready.status("alice")["backup_codes_left"] == 10
    r = ready.call("verify", "alice", codes[2])
    assert r.rc == EXIT_REJECTED, r  # the old set is void
    assert ready.call("verify", "alice", fresh[0]).rc == EXIT_OK
    assert ready.status("alice")["backup_codes_left"] == 9
    generated = [row for row in ready.audit("--user", "alice") if row["event"] == "backup_codes_generated"]
    assert len(generated) == 2


def test_backup_codes_of_one_user_do_not_work_for_another(ready: Cli) -> None:
    ready.enroll("alice")
    ready.enroll("bob")
    codes = BACKUP_CODE_RE.findall(ready.call("backup-codes", "generate", "alice").out)
    assert ready.call("verify", "bob", codes[0]).rc == EXIT_REJECTED
    assert ready.status("alice")["backup_codes_left"] == 10


def test_backup_codes_go_to_the_user_named_with_a_realm(ready: Cli) -> None:
    """The same raw name must mean the same account in every command; a name whose
    canonical form would not be stable (two realms) is refused by every command."""
    ready.configure({"usernames": {"strip_realms": ["CORP"]}})
    for command in (
        ["enroll", "totp", "alice@CORP@CORP", "--no-confirm"],
        ["backup-codes", "generate", "CORP\\alice@CORP"],
    ):
        r = ready.call(*command)
        assert r.rc == EXIT_REFUSED, r
        assert "more than one realm" in r.err
    ready.enroll("alice@CORP")
    r = ready.call("backup-codes", "generate", "CORP\\alice")
    assert r.rc == EXIT_OK, r
    assert "Backup codes for alice." in r.out
    codes = BACKUP_CODE_RE.findall(r.out)
    # The user the command prints, the user `status` shows, and the user the codes verify for
    # must be one and the same account.
    assert ready.status("alice")["backup_codes_left"] == 10
    assert ready.call("verify", "alice@corp", codes[0]).rc == EXIT_OK
    assert ready.status("CORP\\alice")["backup_codes_left"] == 9


# ---------------------------------------------------------------------------
# Lockout


@pytest.mark.slow
def test_lockout_and_unlock(ready: Cli) -> None:
    ready.configure({"lockout": {"max_failures": 3}})
    _, secret, _ = ready.enroll("alice")
    right = code(secret)
    for wrong in wrong_codes(secret, 3):
        r = ready.run("verify", "alice", wrong)
        assert r.rc == EXIT_REJECTED, r
    r = ready.run("verify", "alice", right)
    assert r.rc == EXIT_REJECTED, r
    assert "locked" in r.text
    state = ready.status("alice")
    assert state["locked"] is True and state["locked_until"] is not None
    assert "lock" in events(ready.audit("--user", "alice"))
    text = ready.run("status", "alice")
    assert text.rc == EXIT_OK and "locked until" in text.out

    r = ready.run("unlock", "alice")
    assert r.rc == EXIT_OK, r
    assert "unlock" in events(ready.audit("--user", "alice"))
    state = ready.status("alice")
    assert state["locked"] is False and state["failures"] == 0
    r = ready.run("verify", "alice", code(secret, 1))
    assert r.rc == EXIT_OK, r


def test_hard_lock_needs_unlock(ready: Cli) -> None:
    ready.configure({"lockout": {"max_failures": 2, "hard_lock_after": 2}})
    _, secret, _ = ready.enroll("alice")
    for wrong in wrong_codes(secret, 2):
        assert ready.call("verify", "alice", wrong).rc == EXIT_REJECTED
    state = ready.status("alice")
    assert state["locked"] is True and state["hard_locked"] is True
    assert "hard-locked" in ready.call("status", "alice").out
    assert ready.call("verify", "alice", code(secret)).rc == EXIT_REJECTED
    r = ready.call("unlock", "alice")
    assert r.rc == EXIT_OK and "hard" in r.out, r
    assert ready.call("verify", "alice", code(secret)).rc == EXIT_OK


def test_unlock_a_user_who_is_not_locked(ready: Cli) -> None:
    r = ready.call("unlock", "nobody-here")
    assert r.rc == EXIT_OK, r
    assert "not locked" in r.out


# ---------------------------------------------------------------------------
# status


@pytest.mark.slow
def test_status_text_and_json(ready: Cli) -> None:
    r = ready.run("status", "alice")
    assert r.rc == EXIT_OK, r
    assert "alice" in r.out and "required" in r.out and "not locked" in r.out
    assert re.search(r"active devices:\s+0 of 0", r.out), r

    device_id, _, _ = ready.enroll("alice", "--label", "Phone")
    r = ready.run("status", "alice")
    assert r.rc == EXIT_OK, r
    assert re.search(r"active devices:\s+1 of 1", r.out), r
    assert f"{device_id}: totp 'Phone' active" in r.out
    assert re.search(r"backup codes:\s+0 left", r.out)

    data = ready.status("alice")
    assert data["user"] == "alice"
    assert data["requirement"] == "required"
    assert data["active_devices"] == 1
    assert [d["id"] for d in data["devices"]] == [device_id]
    assert data["locked"] is False and data["hard_locked"] is False
    assert data["backup_codes_left"] == 0
    assert "secret" not in json.dumps(data)


def test_status_of_exempt_user(ready: Cli) -> None:
    ready.configure({"enforcement": {"exempt_users": ["bob"]}})
    r = ready.run("status", "bob")
    assert r.rc == EXIT_OK, r
    assert "exempt" in r.out
    assert ready.status("bob")["requirement"] == "exempt"
    assert ready.status("alice")["requirement"] == "required"


# ---------------------------------------------------------------------------
# report


@pytest.mark.slow
def test_report_lists_login_accounts_root_first(ready: Cli) -> None:
    expected, left_out = login_capable_accounts()
    r = ready.run("report", "--json")
    assert r.rc == EXIT_REJECTED, r
    data = json.loads(r.out)
    users = [a["user"] for a in data["accounts"]]
    assert users[0] == "root"
    assert set(users) == expected
    assert not set(users) & left_out
    assert not [a for a in data["accounts"] if a["status"] in ("covered", "exempt")]
    assert set(data["uncovered"]) == expected
    assert data["total"] == len(expected) and data["covered"] == 0

    r = ready.run("report")
    assert r.rc == EXIT_REJECTED, r
    assert "root" in r.out and "uncovered" in r.out


@pytest.mark.slow
def test_report_marks_accounts_without_an_active_device(ready: Cli) -> None:
    expected, _ = login_capable_accounts()
    root_id, _, _ = ready.enroll("root")
    data = json.loads(ready.call("report", "--json").out)
    root = data["accounts"][0]
    assert root["user"] == "root" and root["status"] == "covered" and root["active_devices"] == 1
    assert "root" not in data["uncovered"]
    assert set(data["uncovered"]) == expected - {"root"}

    assert ready.call("devices", "disable", "root", str(root_id), "--force").rc == EXIT_OK
    r = ready.run("report", "--json")
    assert r.rc == EXIT_REJECTED, r
    root = json.loads(r.out)["accounts"][0]
    assert root["status"] == "uncovered" and root["active_devices"] == 0 and root["devices"] == 1
    assert "none is active" in root["note"]


def test_report_exempt_users_are_not_uncovered(ready: Cli) -> None:
    expected, _ = login_capable_accounts()
    others = sorted(expected - {"root"})
    ready.configure({"enforcement": {"exempt_users": others}})
    ready.enroll("root")
    r = ready.run("report", "--json")
    assert r.rc == EXIT_OK, r
    data = json.loads(r.out)
    assert data["uncovered"] == []
    assert data["exempt"] == len(others)
    assert {a["user"] for a in data["accounts"] if a["status"] == "exempt"} == set(others)


@pytest.mark.slow
def test_report_exits_0_when_every_account_is_covered(ready: Cli) -> None:
    expected, _ = login_capable_accounts()
    for user in sorted(expected):
        ready.enroll(user)
    r = ready.run("report", "--json")
    assert r.rc == EXIT_OK, r
    data = json.loads(r.out)
    assert data["covered"] == data["total"] == len(expected)
    assert data["uncovered"] == []
    r = ready.run("report")
    assert r.rc == EXIT_OK, r
    assert f"{len(expected)} of {len(expected)}" in r.out


# ---------------------------------------------------------------------------
# audit


def test_audit_show_json_lines(ready: Cli) -> None:
    ready.enroll("alice")
    r = ready.run("audit", "show", "--json")
    assert r.rc == EXIT_OK, r
    rows = json_lines(r.out)
    assert len(rows) == len(r.out.strip().splitlines()) == 2
    for row in rows:
        assert {"id", "event", "ts", "time", "user", "device_id", "reason", "hash", "prev_hash"} <= set(row)
    assert events(rows) == ["init", "device_added"]
    assert [row["id"] for row in rows] == [1, 2]
    r = ready.run("audit", "show")
    assert r.rc == EXIT_OK, r
    assert "device_added" in r.out and "alice" in r.out


def test_audit_show_filters(backdated: Cli) -> None:
    backdated.enroll("alice")
    backdated.enroll("bob")
    every = backdated.audit()
    users = [row["user"] for row in every]
    assert {"threedays", "twohours", "alice", "bob"} <= set(users)

    assert [row["user"] for row in backdated.audit("--user", "alice")] == ["alice"]
    recent = backdated.audit("--since", "30m")
    assert "threedays" not in [row["user"] for row in recent] and "twohours" not in [row["user"] for row in recent]
    assert "alice" in [row["user"] for row in recent]
    day = [row["user"] for row in backdated.audit("--since", "1d")]
    assert "twohours" in day and "threedays" not in day
    week = [row["user"] for row in backdated.audit("--since", "1w")]
    assert "threedays" in week

    two_days_ago = (dt.datetime.now(dt.UTC) - dt.timedelta(days=2)).date().isoformat()
    by_date = [row["user"] for row in backdated.audit("--since", two_days_ago)]
    assert "twohours" in by_date and "threedays" not in by_date
    instant = (dt.datetime.now(dt.UTC) - dt.timedelta(hours=36)).strftime("%Y-%m-%dT%H:%M:%SZ")
    by_instant = [row["user"] for row in backdated.audit("--since", instant)]
    assert "twohours" in by_instant and "threedays" not in by_instant
    tomorrow = (dt.datetime.now(dt.UTC) + dt.timedelta(days=1)).date().isoformat()
    assert backdated.audit("--since", tomorrow) == []

    limited = backdated.audit("--limit", "2")
    assert limited == every[-2:]
    assert backdated.audit("--user", "alice", "--limit", "5") == [row for row in every if row["user"] == "alice"]
    assert backdated.audit("--user", "twohours", "--since", "30m") == []

    r = backdated.run("audit", "show", "--since", "2h", "--user", "alice", "--limit", "1", "--json")
    assert r.rc == EXIT_OK, r
    assert json_lines(r.out) == [row for row in every if row["user"] == "alice"][-1:]


@pytest.mark.parametrize("value", ["yesterday", "30x", "-5m", "2026-13-01", ""])
def test_audit_bad_since_is_a_usage_error(ready: Cli, value: str) -> None:
    r = ready.run("audit", "show", f"--since={value}")
    assert r.rc == EXIT_USAGE, r
    assert "--since" in r.err and "30m" in r.err


def test_audit_limit_must_be_positive_with_a_clear_message(ready: Cli) -> None:
    r = ready.run("audit", "show", "--limit", "0")
    assert r.rc == EXIT_USAGE, r
    assert "--limit" in r.err
    assert "device id" not in r.err, "the --limit error calls the value a device id"


@pytest.mark.slow
def test_audit_export_and_after_id(backdated: Cli) -> None:
    backdated.enroll("alice")
    r = backdated.run("audit", "export")
    assert r.rc == EXIT_OK, r
    rows = json_lines(r.out)
    assert rows == backdated.audit()
    ids = [row["id"] for row in rows]
    assert ids == sorted(ids) and len(ids) >= 4
    cut = ids[1]
    r = backdated.run("audit", "export", "--after-id", str(cut))
    assert r.rc == EXIT_OK, r
    later = json_lines(r.out)
    assert [row["id"] for row in later] == [i for i in ids if i > cut]
    r = backdated.run("audit", "export", "--after-id", str(ids[-1]))
    assert r.rc == EXIT_OK and r.out.strip() == "", r
    recent = json_lines(backdated.call("audit", "export", "--since", "30m").out)
    assert "threedays" not in [row["user"] for row in recent]
    assert backdated.call("audit", "export", "--since", "bogus").rc == EXIT_USAGE


@pytest.mark.slow
def test_audit_verify_fresh_and_tampered(ready: Cli) -> None:
    ready.enroll("alice")
    ready.enroll("bob")
    r = ready.run("audit", "verify")
    assert r.rc == EXIT_OK, r
    assert "intact" in r.out
    report = json.loads(ready.call("audit", "verify", "--json").out)
    assert report["ok"] is True and report["rows_checked"] == 3 and report["problems"] == []

    ready.sql(
        "DROP TRIGGER audit_append_only_update",
        "DROP TRIGGER audit_append_only_delete",
        "UPDATE audit SET reason = 'nothing to see' WHERE id = 2",
    )
    r = ready.run("audit", "verify")
    assert r.rc == EXIT_REJECTED, r
    assert re.search(r"\brow 2\b", r.out), r
    assert not re.search(r"\brow [13]\b", r.out), r
    r = ready.run("audit", "verify", "--json")
    assert r.rc == EXIT_REJECTED, r
    report = json.loads(r.out)
    assert report["ok"] is False
    assert {p["row"] for p in report["problems"] if "trigger" not in p["problem"]} == {2}
    assert len([p for p in report["problems"] if "trigger" in p["problem"] and "missing" in p["problem"]]) == 2


def test_audit_verify_detects_a_deleted_row(ready: Cli) -> None:
    for user in ("alice", "bob", "carol"):
        ready.enroll(user)
    ready.sql("DROP TRIGGER audit_append_only_delete", "DELETE FROM audit WHERE id = 2")
    r = ready.run("audit", "verify")
    assert r.rc == EXIT_REJECTED, r
    assert "missing" in r.out or "deleted" in r.out


def test_audit_log_is_append_only_while_triggers_stand(ready: Cli) -> None:
    ready.enroll("alice")
    with pytest.raises(sqlite3.DatabaseError):
        ready.sql("UPDATE audit SET reason = 'x' WHERE id = 1")
    with pytest.raises(sqlite3.DatabaseError):
        ready.sql("DELETE FROM audit WHERE id = 1")
    assert ready.call("audit", "verify").rc == EXIT_OK


@pytest.mark.slow
def test_no_secret_or_code_in_the_audit_log(ready: Cli) -> None:
    _, secret, _ = ready.enroll("alice")
    used = [code(secret)]
    assert ready.run("verify", "alice", used[0]).rc == EXIT_OK
    assert ready.run("verify", "alice", used[0]).rc == EXIT_REJECTED  # replay
    bad = wrong_codes(secret, 2)
    used += bad
    for wrong in bad:
        assert ready.run("verify", "alice", wrong).rc == EXIT_REJECTED
    backup = BACKUP_CODE_RE.findall(ready.call("backup-codes", "generate", "alice").out)
    assert ready.run("verify", "alice", backup[0]).rc == EXIT_OK
    assert ready.run("verify", "alice", backup[0]).rc == EXIT_REJECTED
    assert ready.run("verify", "alice", "99999-99998").rc == EXIT_REJECTED
    used += [backup[0], backup[0].replace("-", ""), "99999-99998", "9999999998"]
    used += [b.replace("-", "") for b in backup] + backup

    r = ready.run("audit", "export")
    assert r.rc == EXIT_OK, r
    rows = json_lines(r.out)
    assert "auth" in events(rows) and "backup_code_used" in events(rows)
    secret_b32 = b32(secret)
    assert secret_b32 not in r.out and secret_b32.lower() not in r.out
    assert secret.hex() not in r.out
    # Time stamps and hashes are digits and hex by nature: look everywhere else.
    scrubbed = json.dumps(
        [{k: v for k, v in row.items() if k not in ("ts", "time", "hash", "prev_hash")} for row in rows]
    )
    for typed in used:
        assert typed not in scrubbed, f"code {typed} appears in the audit log"


# ---------------------------------------------------------------------------
# User names


BAD_NAMES = ["al\x01ice", ""]

USER_COMMANDS = [
    ["enroll", "totp", "{user}", "--no-confirm", "--no-qr"],
    ["status", "{user}"],
    ["devices", "list", "{user}"],
    ["devices", "disable", "{user}", "1"],
    ["devices", "rename", "{user}", "1", "label"],
    ["backup-codes", "generate", "{user}"],
    ["unlock", "{user}"],
    ["verify", "{user}", "123456"],
    ["audit", "show", "--user", "{user}"],
]


@pytest.mark.parametrize("name", BAD_NAMES, ids=repr)
@pytest.mark.parametrize("command", USER_COMMANDS, ids=lambda c: " ".join(c[:2]).replace(" {user}", ""))
def test_invalid_user_name_is_refused(ready: Cli, command: list[str], name: str) -> None:
    ready.enroll("alice")
    audit_before = ready.audit()
    r = ready.call(*[part.replace("{user}", name) for part in command])
    assert r.rc == EXIT_REFUSED, r
    assert "user name" in r.err
    assert [d["user"] for d in ready.devices()] == ["alice"]
    if command[0] != "verify":
        assert ready.audit() == audit_before


@pytest.mark.parametrize("name", [" alice", "alice ", "al\x7fice", "al\x85ice", "alice\u200b", "a" * 257], ids=repr)
def test_other_invalid_user_names(ready: Cli, name: str) -> None:
    for command in (["enroll", "totp", name, "--no-confirm", "--no-qr"], ["status", name]):
        r = ready.call(*command)
        assert r.rc == EXIT_REFUSED, r
        assert "user name" in r.err
    assert ready.devices() == []


@pytest.mark.slow
def test_invalid_user_name_through_the_executable(ready: Cli) -> None:
    r = ready.run("enroll", "totp", "al\x01ice", "--no-confirm", "--no-qr")
    assert r.rc == EXIT_REFUSED, r
    assert "control" in r.err and "U+0001" in r.err
    assert URI_RE.search(r.out) is None
    r = ready.run("status", "")
    assert r.rc == EXIT_REFUSED, r
    assert "empty" in r.err
    # Invalid UTF-8 on the command line (Python hands it over as surrogate escapes).
    proc = subprocess.run(
        [os.fsencode(MFA_ADMIN), b"--config", os.fsencode(ready.config), b"enroll", b"totp", b"al\xffice", b"--no-qr"],
        capture_output=True,
        env=ready.environ(),
        timeout=SUBPROCESS_TIMEOUT,
        check=False,
    )
    assert proc.returncode == EXIT_REFUSED, proc
    assert b"UTF-8" in proc.stderr
    assert ready.devices() == []


def test_case_fold_and_realms_share_one_account(ready: Cli) -> None:
    ready.configure({"usernames": {"strip_realms": ["CORP"], "case_fold": True}})
    _, secret, _ = ready.enroll("Alice@corp")
    assert [d["user"] for d in ready.devices()] == ["alice"]
    assert ready.run("verify", "CORP\\ALICE", code(secret)).rc == EXIT_OK
    assert ready.status("alice@CORP")["last_success_at"] is not None
    assert [d["user"] for d in ready.devices("alice@OTHER")] == []
