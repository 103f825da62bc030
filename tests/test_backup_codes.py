"""Backup codes: ten one-time codes, stored only as digests, each usable exactly once."""

from __future__ import annotations

import re
import threading
from typing import TYPE_CHECKING

import pytest

from devicedb import backup_codes
from devicedb.manage import DeviceManager
from devicedb.models import Context, Result
from devicedb.store import Store
from devicedb.verifier import Verifier

if TYPE_CHECKING:
    from conftest import Enroll, Lib, MfaEnv

CTX = Context(service="test")
CODE_FORMAT = re.compile(r"[0-9]{5}-[0-9]{5}", re.ASCII)
EASY_LOCKOUT = "lockout:\n  max_failures: 100\n  hard_lock_after: 100\n"


@pytest.fixture
def env(mfa_env: MfaEnv, enroll: Enroll, lib: type[Lib]) -> tuple[MfaEnv, Store, Verifier, DeviceManager]:
    store = mfa_env.open(mfa_env.initialise(EASY_LOCKOUT))
    # Backup codes stand in for a device, but the user must have one enrolled.
    enroll(store, "alice", lib.secret_for(1))
    enroll(store, "bob", lib.secret_for(2))
    return mfa_env, store, mfa_env.verifier(store), DeviceManager(store)


def test_generate_returns_ten_distinct_codes(env: tuple[MfaEnv, Store, Verifier, DeviceManager]) -> None:
    _, store, _, manager = env
    codes = manager.generate_backup_codes("alice", CTX)
    assert len(codes) == 10
    assert all(CODE_FORMAT.fullmatch(c) for c in codes), codes
    assert len(set(codes)) == 10
    assert store.backup_codes_left("alice") == 10
    assert store.backup_codes_left("bob") == 0
    # Backup codes are not devices.
    assert len(store.list_devices("alice")) == 1


def test_a_code_works_once_with_or_without_dash(env: tuple[MfaEnv, Store, Verifier, DeviceManager]) -> None:
    _, store, verifier, manager = env
    codes = manager.generate_backup_codes("alice", CTX)
    first, second = codes[0], codes[1]

    decision = verifier.verify("alice", first, CTX)
    assert decision.result is Result.ACCEPTED, decision
    assert store.backup_codes_left("alice") == 9
    assert verifier.verify("alice", first, CTX).result is Result.REPLAY
    assert verifier.verify("alice", first.replace("-", ""), CTX).result is Result.REPLAY
    assert store.backup_codes_left("alice") == 9

    assert verifier.verify("alice", second.replace("-", ""), CTX).result is Result.ACCEPTED
    assert store.backup_codes_left("alice") == 8
    assert verifier.verify("alice", second, CTX).result is Result.REPLAY
    assert store.backup_codes_left("alice") == 8


FULLWIDTH = str.maketrans("0123456789", "".join(chr(0xFF10 + i) for i in range(10)))
MANGLES = {
    "leading-space": lambda c: " " + c,
    "trailing-newline": lambda c: c + "\n",
    "space-for-dash": lambda c: c.replace("-", " "),
    "double-dash": lambda c: c[:5] + "--" + c[6:],
    "fullwidth": lambda c: c.translate(FULLWIDTH),
    "one-digit-short": lambda c: c[:-1],
    "one-digit-long": lambda c: c + "0",
}


def test_mangled_backup_codes_are_refused(env: tuple[MfaEnv, Store, Verifier, DeviceManager]) -> None:
    _, store, verifier, manager = env
    code = manager.generate_backup_codes("alice", CTX)[0]
    for name, mangle in MANGLES.items():
        mangled = mangle(code)
        assert mangled != code
        assert verifier.verify("alice", mangled, CTX).result is Result.BAD_CODE, name
    assert store.backup_codes_left("alice") == 10
    assert verifier.verify("alice", code, CTX).result is Result.ACCEPTED


def test_codes_belong_to_their_user(env: tuple[MfaEnv, Store, Verifier, DeviceManager]) -> None:
    _, store, verifier, manager = env
    alice_codes = manager.generate_backup_codes("alice", CTX)
    manager.generate_backup_codes("bob", CTX)
    assert verifier.verify("bob", alice_codes[0], CTX).result is Result.BAD_CODE
    assert store.backup_codes_left("bob") == 10
    assert verifier.verify("alice", alice_codes[0], CTX).result is Result.ACCEPTED


def test_regenerating_voids_the_old_set(env: tuple[MfaEnv, Store, Verifier, DeviceManager]) -> None:
    _, store, verifier, manager = env
    old = manager.generate_backup_codes("alice", CTX)
    assert verifier.verify("alice", old[0], CTX).result is Result.ACCEPTED

    new = manager.generate_backup_codes("alice", CTX)

    assert not set(old) & set(new)
    assert store.backup_codes_left("alice") == 10
    for code in old[1:4]:
        decision = verifier.verify("alice", code, CTX)
        assert decision.result is not Result.ACCEPTED, decision
        assert decision.result is Result.BAD_CODE
    assert store.backup_codes_left("alice") == 10
    assert verifier.verify("alice", new[0], CTX).result is Result.ACCEPTED
    generated = [r for r in store.audit_rows(user="alice") if r.event == "backup_codes_generated"]
    assert [r.detail["voided_unused"] for r in generated] == [0, 9]


def test_codes_are_stored_only_as_digests(env: tuple[MfaEnv, Store, Verifier, DeviceManager]) -> None:
    mfa_env, store, verifier, manager = env
    codes = manager.generate_backup_codes("alice", CTX)
    assert verifier.verify("alice", codes[0], CTX).result is Result.ACCEPTED
    digits = [c.replace("-", "") for c in codes]
    forms = [f.encode() for f in codes + digits]

    raw = mfa_env.raw()
    try:
        rows = raw.execute("SELECT * FROM backup_codes").fetchall()
        sets = raw.execute("SELECT * FROM backup_code_sets").fetchall()
        audit = raw.execute("SELECT * FROM audit").fetchall()
    finally:
        raw.close()
    assert len(rows) == 10
    (salt_row,) = sets
    salt = bytes(salt_row[1])
    stored = {bytes(r[2]) for r in rows}
    assert all(len(d) == 32 for d in stored)
    # The stored digests are the scrypt digests of the codes under the set's salt, and nothing else.
    assert len(stored) == 10
    assert {backup_codes.digest(d, salt) for d in digits[:2]} <= stored
    for row in rows + sets + audit:
        text = repr(row).encode()
        for form in forms:
            assert form not in text

    blob = mfa_env.db_bytes()
    assert len(blob) > 4096
    for form in forms:
        assert form not in blob, "a backup code is stored in the clear in the database file"


@pytest.mark.slow
def test_thirty_threads_one_code_exactly_one_success(mfa_env: MfaEnv, enroll: Enroll, lib: type[Lib]) -> None:
    settings = mfa_env.initialise(EASY_LOCKOUT)
    admin = mfa_env.open(settings)
    enroll(admin, "alice", lib.secret_for(1))
    code = DeviceManager(admin).generate_backup_codes("alice", CTX)[0]

    n = 30
    barrier = threading.Barrier(n)
    results: list[Result | BaseException] = [RuntimeError("did not finish")] * n

    def attempt(i: int) -> None:
        try:
            # Each thread has its own Store (its own connection) and Verifier.
            with Store.open(settings, clock=mfa_env.clock) as store:
                verifier = Verifier(settings, store=store, clock=mfa_env.clock)
                barrier.wait(timeout=60)
                results[i] = verifier.verify("alice", code, Context(service=f"thread-{i}")).result
        except BaseException as exc:
            results[i] = exc

    threads = [threading.Thread(target=attempt, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, errors

    assert results.count(Result.ACCEPTED) == 1, results
    assert results.count(Result.REPLAY) == n - 1, results
    assert admin.backup_codes_left("alice") == 9
    used = [r for r in admin.audit_rows(user="alice") if r.event == "backup_code_used"]
    assert len(used) == 1


def test_backup_codes_stand_in_for_a_disabled_device(env: tuple[MfaEnv, Store, Verifier, DeviceManager]) -> None:
    """A lost device is disabled by the administrator; its owner can still log in with a backup code."""
    _, store, verifier, manager = env
    codes = manager.generate_backup_codes("alice", CTX)
    (device,) = store.list_devices("alice")
    manager.set_enabled("alice", device.id, False, CTX)
    assert verifier.verify("alice", codes[0], CTX).result is Result.ACCEPTED
    assert verifier.verify("alice", codes[0], CTX).result is Result.REPLAY


def test_backup_codes_alone_are_no_enrollment(env: tuple[MfaEnv, Store, Verifier, DeviceManager]) -> None:
    _, store, verifier, manager = env
    codes = manager.generate_backup_codes("carol", CTX)  # carol has no device
    assert verifier.verify("carol", codes[0], CTX).result is Result.NO_DEVICE
    assert store.backup_codes_left("carol") == 10
