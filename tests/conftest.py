"""Shared fixtures and helpers for the mfaguard core tests.

Everything runs against real SQLite files in a private (0700) tmp_path, with an
injected, mutable clock. Nothing of SQLite or the filesystem is mocked.

Test modules never import this file at run time (``from conftest import ...``): other
conftest.py files under tests/ share the module name ``conftest``, so such an import
would pick up whichever was loaded last. Helpers reach the tests through fixtures,
mainly ``lib`` (see :class:`Lib`); type names may be imported under TYPE_CHECKING.
Worker functions for spawned processes live in the test modules and report through
the queue themselves (see :func:`run_processes`).
"""

from __future__ import annotations

import hmac
import json
import multiprocessing
import os
import queue as queue_module
import sqlite3
import struct
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from devicedb.manage import DeviceManager, TotpEnrollment
from devicedb.models import Context
from devicedb.settings import Settings, parse_settings
from devicedb.store import Store
from devicedb.verifier import Verifier

# RFC 6238 Appendix B seeds (ASCII "1234567890" repeated to the HMAC's natural key size).
RFC_SEEDS: dict[str, bytes] = {
    "sha1": b"12345678901234567890",
    "sha256": b"12345678901234567890123456789012",
    "sha512": b"1234567890123456789012345678901234567890123456789012345678901234",
}

# A fixed "now": 10 seconds into a 30-second step, so that +1 s stays in the same step.
T0 = (1_700_000_000 // 30) * 30 + 10
CTX = Context(service="test")
OTHER_UID = 65534  # nobody


# ---------------------------------------------------------------------------
# Root-only tests: skip when not root, but never silently in CI.


def ensure_root() -> None:
    """Skip a test that needs root when not root; with CI=true, fail instead."""
    if os.geteuid() == 0:
        return
    reason = "needs root (chown to another uid for file-ownership checks)"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason}, and CI=true: root tests must run in CI, not be skipped")
    pytest.skip(reason)


@pytest.fixture
def require_root() -> None:
    ensure_root()


def pytest_runtest_setup(item: pytest.Item) -> None:
    # Every @pytest.mark.root test goes through the same check, whether or not it asks for the fixture.
    if item.get_closest_marker("root") is not None:
        ensure_root()


# ---------------------------------------------------------------------------
# Clock and reference TOTP.


class Clock:
    """A mutable injected clock: ``Store.open(settings, clock=clock)``."""

    def __init__(self, now: float) -> None:
        self.now = float(now)

    def __call__(self) -> float:
        return self.now

    def set(self, now: float) -> None:
        self.now = float(now)

    def advance(self, seconds: float) -> None:
        self.now += seconds


def rfc6238_code(secret: bytes, unix_time: float, *, digits: int = 6, algorithm: str = "sha1", period: int = 30) -> str:
    """An independent RFC 6238 / RFC 4226 implementation, to check the core against."""
    return hotp_code(secret, int(unix_time // period), digits=digits, algorithm=algorithm)


def hotp_code(secret: bytes, counter: int, *, digits: int = 6, algorithm: str = "sha1") -> str:
    mac = hmac.new(secret, struct.pack(">Q", counter), algorithm).digest()
    offset = mac[-1] & 0x0F
    value = int.from_bytes(mac[offset : offset + 4], "big") & 0x7FFFFFFF
    return str(value % 10**digits).zfill(digits)


def wrong_code(secret: bytes, unix_time: float, *, digits: int = 6, algorithm: str = "sha1", period: int = 30) -> str:
    """A well-formed code that no step within ±5 of ``unix_time`` produces."""
    step = int(unix_time // period)
    valid = {hotp_code(secret, s, digits=digits, algorithm=algorithm) for s in range(step - 5, step + 6)}
    for digit in "0123456789":
        candidate = digit * digits
        if candidate not in valid:
            return candidate
    raise AssertionError("unreachable: ten candidates cannot all be valid codes")


def secret_for(n: int) -> bytes:
    """A distinct 20-byte secret per n."""
    return hmac.new(b"mfaguard-tests", str(n).encode(), "sha256").digest()[:20]


# ---------------------------------------------------------------------------
# A private test installation: settings, database, key file.


@dataclass
class MfaEnv:
    root: Path
    clock: Clock
    stores: list[Store] = field(default_factory=list)

    @property
    def db_dir(self) -> Path:
        return self.root / "db"

    @property
    def db_path(self) -> Path:
        return self.db_dir / "mfaguard.db"

    @property
    def key_dir(self) -> Path:
        return self.root / "keys"

    @property
    def key_path(self) -> Path:
        return self.key_dir / "seal.key"

    def yaml(
        self, extra: str = "", *, db_path: Path | None = None, key_path: Path | None = None, database: str = ""
    ) -> str:
        """Settings YAML with the database and key in this env.

        ``extra`` adds top-level sections; ``database`` adds keys to the database section.
        """
        db = json.dumps(str(db_path or self.db_path))
        key = json.dumps(str(key_path or self.key_path))
        more = "".join(f"  {line.strip()}\n" for line in database.splitlines() if line.strip())
        return f"database:\n  path: {db}\n  key_file: {key}\n{more}" + textwrap.dedent(extra)

    def settings(self, extra: str = "", **kw: Any) -> Settings:
        return parse_settings(self.yaml(extra, **kw), source=str(self.root / "test.yaml"))

    def initialise(self, extra: str = "", **kw: Any) -> Settings:
        settings = self.settings(extra, **kw)
        Store.initialise(settings, clock=self.clock)
        return settings

    def open(self, settings: Settings) -> Store:
        store = Store.open(settings, clock=self.clock)
        self.stores.append(store)
        return store

    def verifier(self, store: Store) -> Verifier:
        # The store's clock decides tx.now; give the verifier the same one.
        return Verifier(store.settings, store=store, clock=self.clock)

    def raw(self) -> sqlite3.Connection:
        """A raw sqlite3 connection to the database file, for tampering and inspection."""
        return sqlite3.connect(str(self.db_path), isolation_level=None)

    def db_bytes(self) -> bytes:
        """The bytes of the database file and its WAL, as an attacker reading the disk sees them."""
        return b"".join(p.read_bytes() for p in sorted(self.db_dir.iterdir()) if p.is_file())


@pytest.fixture
def clock() -> Clock:
    return Clock(T0)


@pytest.fixture
def mfa_env(tmp_path: Path, clock: Clock) -> Iterator[MfaEnv]:
    os.chmod(tmp_path, 0o700)  # the core refuses group/world-writable folders
    env = MfaEnv(tmp_path, clock)
    yield env
    for store in env.stores:
        store.close()  # closing twice is harmless


@pytest.fixture
def settings(mfa_env: MfaEnv) -> Settings:
    """Built-in defaults, with the database and key file in tmp_path; initialised."""
    return mfa_env.initialise()


@pytest.fixture
def store(mfa_env: MfaEnv, settings: Settings) -> Store:
    return mfa_env.open(settings)


@pytest.fixture
def verifier(mfa_env: MfaEnv, store: Store) -> Verifier:
    return mfa_env.verifier(store)


@pytest.fixture
def manager(store: Store) -> DeviceManager:
    return DeviceManager(store)


Enroll = Callable[..., TotpEnrollment]


def enroll_totp(
    store: Store,
    user: str,
    secret: bytes,
    *,
    digits: int = 6,
    algorithm: str = "sha1",
    period: int = 30,
    pending: bool = False,
    label: str | None = None,
    context: Context = CTX,
) -> TotpEnrollment:
    return DeviceManager(store).enroll_totp(
        user, context, secret=secret, pending=pending, digits=digits, algorithm=algorithm, period=period, label=label
    )


@pytest.fixture
def enroll() -> Enroll:
    """``enroll(store, user, secret, digits=6, algorithm="sha1", period=30, pending=False)``."""
    return enroll_totp


# ---------------------------------------------------------------------------
# Multi-process runs: each process opens its own Store; all start at one barrier.


def run_processes(
    target: Callable[..., Any], per_process_args: list[tuple[Any, ...]], timeout: float = 90.0
) -> list[Any]:
    """Run ``target(barrier, queue, index, *args)`` in one spawned process per args tuple.

    ``target`` is a module-level function of a test module. It does its setup (opens its own
    Store), calls ``barrier.wait(timeout=...)`` so that every process acts at the same moment,
    and finally puts ``(index, True, result)`` on the queue, or ``(index, False, traceback)``
    if anything went wrong. Returns the results in process order; fails the test on an error
    or a time-out, and never leaves a process behind.
    """
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(len(per_process_args))
    queue = ctx.Queue()
    procs = [
        ctx.Process(target=target, args=(barrier, queue, i, *args), daemon=True)
        for i, args in enumerate(per_process_args)
    ]
    for proc in procs:
        proc.start()
    results: dict[int, Any] = {}
    errors: list[str] = []
    deadline = time.monotonic() + timeout
    try:
        while len(results) + len(errors) < len(procs):
            try:
                index, ok, value = queue.get(timeout=0.5)
            except queue_module.Empty:
                if time.monotonic() > deadline:
                    pytest.fail(f"worker processes did not all report within {timeout} s")
                # A worker that died without reporting (a crash) would otherwise be waited for in vain.
                dead = [i for i, p in enumerate(procs) if p.exitcode not in (None, 0) and i not in results]
                if dead and queue.empty():
                    pytest.fail(
                        f"worker process(es) {dead} died without reporting: exit codes "
                        f"{[procs[i].exitcode for i in dead]}"
                    )
                continue
            if ok:
                results[index] = value
            else:
                errors.append(f"process {index} failed:\n{value}")
    finally:
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5)
    if errors:
        pytest.fail("\n".join(errors))
    return [results[i] for i in range(len(procs))]


# ---------------------------------------------------------------------------
# The helpers, handed to the tests as one fixture.


class Lib:
    """Shared helpers and constants; tests get this class from the ``lib`` fixture."""

    T0 = T0
    CTX = CTX
    OTHER_UID = OTHER_UID
    RFC_SEEDS = RFC_SEEDS
    Clock = Clock
    code = staticmethod(rfc6238_code)
    hotp = staticmethod(hotp_code)
    wrong_code = staticmethod(wrong_code)
    secret_for = staticmethod(secret_for)
    enroll = staticmethod(enroll_totp)
    run_processes = staticmethod(run_processes)
    ensure_root = staticmethod(ensure_root)


@pytest.fixture
def lib() -> type[Lib]:
    return Lib
