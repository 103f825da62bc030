"""The device store: limits, uniqueness, sealed secrets, management, pending devices, schema."""

from __future__ import annotations

import base64
import os
import sqlite3
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from devicedb import schema
from devicedb.errors import (
    DeviceLimitError,
    DuplicateDeviceError,
    InvalidInput,
    KeyFileError,
    LockoutGuardError,
    NotFound,
    SchemaError,
)
from devicedb.manage import DeviceManager
from devicedb.models import Context, Requirement, Result
from devicedb.settings import Settings, parse_settings
from devicedb.store import Store
from devicedb.verifier import Verifier

if TYPE_CHECKING:
    from conftest import Enroll, Lib, MfaEnv

CTX = Context(service="test")


def audit_count(store: Store) -> int:
    return len(store.audit_rows())


def device_rows(mfa_env: MfaEnv) -> list[tuple[Any, ...]]:
    raw = mfa_env.raw()
    try:
        return raw.execute("SELECT id, user, secret, fingerprint FROM devices ORDER BY id").fetchall()
    finally:
        raw.close()


# ---------------------------------------------------------------------------
# The device limit.


def test_eight_devices_then_the_ninth_is_refused(lib: type[Lib], store: Store, enroll: Enroll) -> None:
    for i in range(8):
        enroll(store, "alice", lib.secret_for(i))
    rows_before = audit_count(store)

    with pytest.raises(DeviceLimitError, match="alice"):
        enroll(store, "alice", lib.secret_for(8))

    assert len(store.list_devices("alice")) == 8
    assert audit_count(store) == rows_before  # no audit row for a refused enrollment
    # Nothing of the refused device stayed behind: its secret is still free for another user.
    enroll(store, "bob", lib.secret_for(8))


def test_pending_devices_count_towards_the_limit(lib: type[Lib], store: Store, enroll: Enroll) -> None:
    for i in range(8):
        enroll(store, "alice", lib.secret_for(i), pending=True)
    with pytest.raises(DeviceLimitError):
        enroll(store, "alice", lib.secret_for(8))
    assert len(store.list_devices("alice")) == 8


@pytest.mark.parametrize("limit", [1, 2, 5])
def test_max_devices_setting_is_respected(lib: type[Lib], mfa_env: MfaEnv, enroll: Enroll, limit: int) -> None:
    store = mfa_env.open(mfa_env.initialise(f"max_devices: {limit}\n"))
    for i in range(limit):
        enroll(store, "alice", lib.secret_for(i))
    with pytest.raises(DeviceLimitError, match=f"max_devices = {limit}"):
        enroll(store, "alice", lib.secret_for(limit))
    assert len(store.list_devices("alice")) == limit
    enroll(store, "bob", lib.secret_for(100))  # the limit is per user
    # Removing one makes room again.
    manager = DeviceManager(store)
    manager.remove("alice", store.list_devices("alice")[0].id, CTX)
    enroll(store, "alice", lib.secret_for(limit))
    assert len(store.list_devices("alice")) == limit


def _enroll_worker(barrier: Any, queue: Any, index: int, yaml_text: str, secret: bytes, now: float) -> None:
    """Spawned: open an own Store, then enroll at the barrier."""
    try:
        settings = parse_settings(yaml_text)
        with Store.open(settings, clock=lambda: now) as store:
            manager = DeviceManager(store)
            barrier.wait(timeout=60)
            try:
                manager.enroll_totp("alice", Context(service="race"), secret=secret, pending=False)
                outcome = "enrolled"
            except DeviceLimitError:
                outcome = "limit"
        queue.put((index, True, outcome))
    except BaseException:
        queue.put((index, False, traceback.format_exc()))


@pytest.mark.slow
def test_two_concurrent_enrollments_at_seven_devices_give_one_success(
    lib: type[Lib], mfa_env: MfaEnv, store: Store
) -> None:
    for i in range(7):
        lib.enroll(store, "alice", lib.secret_for(i))
    yaml_text = mfa_env.yaml()
    for round_ in range(3):
        if round_:
            # Back to seven for the next round.
            DeviceManager(store).remove("alice", store.list_devices("alice")[-1].id, CTX)
        assert len(store.list_devices("alice")) == 7
        args = [(yaml_text, lib.secret_for(1000 * (round_ + 1) + k), float(lib.T0)) for k in range(2)]

        results = lib.run_processes(_enroll_worker, args)

        assert sorted(results) == ["enrolled", "limit"], f"round {round_}: {results}"
        assert len(store.list_devices("alice")) == 8


# ---------------------------------------------------------------------------
# Uniqueness and sealed secrets.


def test_the_same_secret_cannot_be_enrolled_twice(lib: type[Lib], store: Store, enroll: Enroll) -> None:
    secret = lib.secret_for(1)
    enroll(store, "alice", secret)
    rows_before = audit_count(store)
    with pytest.raises(DuplicateDeviceError):
        enroll(store, "alice", secret)
    with pytest.raises(DuplicateDeviceError):
        enroll(store, "bob", secret)  # not for another user either
    with pytest.raises(DuplicateDeviceError):
        enroll(store, "bob", secret, digits=8, algorithm="sha256", period=60)  # nor with other parameters
    assert [d.user for d in store.list_devices()] == ["alice"]
    assert audit_count(store) == rows_before


def test_enroll_refuses_short_secrets_and_bad_parameters(lib: type[Lib], store: Store, enroll: Enroll) -> None:
    with pytest.raises(InvalidInput):
        enroll(store, "alice", b"x" * 15)
    with pytest.raises(InvalidInput):
        enroll(store, "alice", lib.secret_for(1), digits=7)
    with pytest.raises(InvalidInput):
        enroll(store, "alice", lib.secret_for(1), algorithm="md5")
    with pytest.raises(InvalidInput):
        enroll(store, "alice", lib.secret_for(1), period=45)
    assert store.list_devices() == []
    enroll(store, "alice", b"x" * 16)  # 16 bytes is enough


def test_sealed_secret_never_holds_the_raw_secret(
    lib: type[Lib], mfa_env: MfaEnv, store: Store, enroll: Enroll
) -> None:
    secrets = [lib.secret_for(i) for i in range(3)]
    enrollments = [enroll(store, f"user{i}", s) for i, s in enumerate(secrets)]
    rows = device_rows(mfa_env)
    assert len(rows) == 3
    for (_, _, sealed, fingerprint), secret, enrollment in zip(rows, secrets, enrollments, strict=True):
        sealed = bytes(sealed)
        b32 = base64.b32encode(secret).rstrip(b"=")
        assert enrollment.secret_b32.encode() == b32
        assert len(sealed) > len(secret)
        assert secret not in sealed
        assert b32 not in sealed
        assert secret.hex() not in fingerprint
        assert enrollment.device.sealed_secret == sealed
    blob = mfa_env.db_bytes()
    for secret in secrets:
        assert secret not in blob
        assert base64.b32encode(secret).rstrip(b"=") not in blob
        assert secret.hex().encode() not in blob


def _swap_secrets(mfa_env: MfaEnv, first: int, second: int) -> None:
    raw = mfa_env.raw()
    try:
        (a,) = raw.execute("SELECT secret FROM devices WHERE id = ?", (first,)).fetchone()
        (b,) = raw.execute("SELECT secret FROM devices WHERE id = ?", (second,)).fetchone()
        assert a and b and a != b
        raw.execute("BEGIN")
        raw.execute("UPDATE devices SET secret = ? WHERE id = ?", (b, first))
        raw.execute("UPDATE devices SET secret = ? WHERE id = ?", (a, second))
        raw.execute("COMMIT")
    finally:
        raw.close()


def test_swapped_sealed_secrets_between_users_do_not_verify(
    lib: type[Lib], mfa_env: MfaEnv, store: Store, verifier: Verifier, enroll: Enroll
) -> None:
    alice_secret, bob_secret = lib.secret_for(1), lib.secret_for(2)
    alice = enroll(store, "alice", alice_secret).device
    bob = enroll(store, "bob", bob_secret).device
    _swap_secrets(mfa_env, alice.id, bob.id)
    assert len(device_rows(mfa_env)) == 2  # nothing dropped

    for user, secret in (("alice", alice_secret), ("bob", bob_secret), ("alice", bob_secret), ("bob", alice_secret)):
        decision = verifier.verify(user, lib.code(secret, mfa_env.clock()), CTX)
        assert not decision.accepted, (user, decision)
        assert decision.result is Result.ERROR, (user, decision)
        assert "does not open" in decision.reason
    assert all(d.last_step is None for d in store.list_devices())


def test_swapped_sealed_secrets_between_one_users_devices_do_not_verify(
    lib: type[Lib], mfa_env: MfaEnv, store: Store, verifier: Verifier, enroll: Enroll
) -> None:
    first = enroll(store, "alice", lib.secret_for(1)).device
    second = enroll(store, "alice", lib.secret_for(2)).device
    _swap_secrets(mfa_env, first.id, second.id)
    for secret in (lib.secret_for(1), lib.secret_for(2)):
        decision = verifier.verify("alice", lib.code(secret, mfa_env.clock()), CTX)
        assert decision.result is Result.ERROR, decision


def test_device_moved_to_another_user_does_not_verify(
    lib: type[Lib], mfa_env: MfaEnv, store: Store, verifier: Verifier, enroll: Enroll
) -> None:
    device = enroll(store, "alice", lib.secret_for(1)).device
    raw = mfa_env.raw()
    try:
        raw.execute("UPDATE devices SET user = 'mallory' WHERE id = ?", (device.id,))
    finally:
        raw.close()
    decision = verifier.verify("mallory", lib.code(lib.secret_for(1), mfa_env.clock()), CTX)
    assert decision.result is Result.ERROR
    assert not decision.accepted


# ---------------------------------------------------------------------------
# Management: disable, enable, rename, remove; usable devices.


def events(store: Store, user: str = "alice") -> list[str]:
    return [r.event for r in store.audit_rows(user=user)]


def test_disable_enable_rename_remove_are_audited(
    lib: type[Lib], store: Store, manager: DeviceManager, enroll: Enroll
) -> None:
    device = enroll(store, "alice", lib.secret_for(1), label="phone").device
    admin = Context(service="mfa-admin", ruser="operator")

    assert manager.set_enabled("alice", device.id, False, admin) is True
    assert store.list_devices("alice")[0].enabled is False
    assert manager.set_enabled("alice", device.id, False, admin) is False  # already disabled: no change, no row
    assert manager.set_enabled("alice", device.id, True, admin) is True
    assert store.list_devices("alice")[0].enabled is True

    assert manager.rename("alice", device.id, "  work phone  ", admin) == "work phone"
    assert store.list_devices("alice")[0].label == "work phone"

    removed = manager.remove("alice", device.id, admin)
    assert removed.id == device.id
    assert store.list_devices("alice") == []

    rows = store.audit_rows(user="alice")
    assert [r.event for r in rows] == [
        "device_added",
        "device_disabled",
        "device_enabled",
        "device_renamed",
        "device_removed",
    ]
    assert all(r.device_id == device.id for r in rows)
    assert all(r.service == "mfa-admin" and r.detail.get("ruser") == "operator" for r in rows[1:])
    assert rows[3].detail["old"] == "phone" and rows[3].detail["new"] == "work phone"
    assert rows[4].detail["label"] == "work phone"


def test_root_keeps_its_last_active_device_unless_forced(
    store: Store, manager: DeviceManager, enroll: Enroll, lib: type[Lib]
) -> None:
    first = enroll(store, "root", lib.secret_for(1)).device
    rows_before = audit_count(store)
    with pytest.raises(LockoutGuardError, match="root"):
        manager.set_enabled("root", first.id, False, CTX)
    with pytest.raises(LockoutGuardError, match="root"):
        manager.remove("root", first.id, CTX)
    assert [d.usable for d in store.list_devices("root")] == [True]
    assert audit_count(store) == rows_before
    # Another active device makes it safe; a pending one does not.
    enroll(store, "root", lib.secret_for(2), pending=True)
    with pytest.raises(LockoutGuardError):
        manager.remove("root", first.id, CTX)
    second = enroll(store, "root", lib.secret_for(3)).device
    assert manager.set_enabled("root", first.id, False, CTX) is True
    with pytest.raises(LockoutGuardError):
        manager.remove("root", second.id, CTX)
    manager.remove("root", second.id, CTX, force=True)
    assert not any(d.usable for d in store.list_devices("root"))
    # Other users get no such guard.
    alice = enroll(store, "alice", lib.secret_for(4)).device
    manager.remove("alice", alice.id, CTX)


def test_management_refuses_bad_input_and_changes_nothing(
    lib: type[Lib], store: Store, manager: DeviceManager, enroll: Enroll
) -> None:
    device = enroll(store, "alice", lib.secret_for(1), label="phone").device
    rows_before = audit_count(store)
    for label in ("", "   ", "x" * 65, "tab\there", "new\nline"):
        with pytest.raises(InvalidInput):
            manager.rename("alice", device.id, label, CTX)
    with pytest.raises(NotFound):
        manager.remove("bob", device.id, CTX)  # another user's device
    with pytest.raises(NotFound):
        manager.set_enabled("alice", device.id + 1, False, CTX)
    with pytest.raises(NotFound):
        manager.rename("bob", device.id, "mine", CTX)
    (after,) = store.list_devices("alice")
    assert after.label == "phone" and after.enabled
    assert audit_count(store) == rows_before


def test_a_disabled_devices_code_is_rejected(
    lib: type[Lib], store: Store, verifier: Verifier, manager: DeviceManager, enroll: Enroll
) -> None:
    device = enroll(store, "alice", lib.secret_for(1)).device
    manager.set_enabled("alice", device.id, False, CTX)
    code = lib.code(lib.secret_for(1), lib.T0)

    assert verifier.verify("alice", code, CTX).result is Result.NO_USABLE_DEVICE

    other = enroll(store, "alice", lib.secret_for(2)).device
    assert verifier.verify("alice", code, CTX).result is Result.BAD_CODE  # the disabled one is not tried
    assert verifier.verify("alice", lib.code(lib.secret_for(2), lib.T0), CTX).device_id == other.id

    manager.set_enabled("alice", device.id, True, CTX)
    decision = verifier.verify("alice", code, CTX)
    assert decision.result is Result.ACCEPTED and decision.device_id == device.id


def test_a_user_without_devices_gets_no_device(
    lib: type[Lib], store: Store, verifier: Verifier, enroll: Enroll
) -> None:
    enroll(store, "bob", lib.secret_for(1))
    decision = verifier.verify("alice", lib.code(lib.secret_for(1), lib.T0), CTX)
    assert decision.result is Result.NO_DEVICE
    assert not decision.accepted


def test_a_removed_device_no_longer_verifies(
    lib: type[Lib], store: Store, verifier: Verifier, manager: DeviceManager, enroll: Enroll
) -> None:
    device = enroll(store, "alice", lib.secret_for(1)).device
    manager.remove("alice", device.id, CTX)
    assert verifier.verify("alice", lib.code(lib.secret_for(1), lib.T0), CTX).result is Result.NO_DEVICE


def test_a_locked_database_fails_closed(mfa_env: MfaEnv, enroll: Enroll, lib: type[Lib]) -> None:
    settings = mfa_env.initialise(database="busy_timeout_ms: 50")
    assert settings.database.busy_timeout_ms == 50
    store = mfa_env.open(settings)
    enroll(store, "alice", lib.secret_for(1))
    blocker = mfa_env.raw()
    try:
        blocker.execute("BEGIN IMMEDIATE")  # another process holds the write lock
        decision = mfa_env.verifier(store).verify("alice", lib.code(lib.secret_for(1), lib.T0), CTX)
        assert decision.result is Result.ERROR
        assert not decision.accepted
        assert "busy or locked" in decision.reason
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    (device,) = store.list_devices("alice")
    assert device.last_step is None


def test_the_verifier_fails_closed_without_a_usable_database(mfa_env: MfaEnv, lib: type[Lib]) -> None:
    settings = mfa_env.settings()  # never initialised
    verifier = Verifier(settings, clock=mfa_env.clock)
    decision = verifier.verify("alice", "123456", CTX)
    assert decision.result is Result.ERROR
    assert "mfa-admin init" in decision.reason
    assert verifier.requirement("alice", CTX).requirement is Requirement.REQUIRED
    assert not mfa_env.db_path.exists()


# ---------------------------------------------------------------------------
# Pending devices.


def test_pending_device_needs_confirmation_and_the_code_is_then_spent(
    lib: type[Lib], mfa_env: MfaEnv, store: Store, verifier: Verifier, enroll: Enroll
) -> None:
    secret = lib.secret_for(1)
    device = enroll(store, "alice", secret, pending=True).device
    assert device.pending
    code = lib.code(secret, lib.T0)

    assert verifier.verify("alice", code, CTX).result is Result.NO_USABLE_DEVICE
    assert store.users_with_usable_devices() == set()

    wrong = verifier.confirm_enrollment("alice", device.id, lib.wrong_code(secret, lib.T0), CTX)
    assert wrong.result is Result.BAD_CODE
    assert store.list_devices("alice")[0].pending

    confirmed = verifier.confirm_enrollment("alice", device.id, code, CTX)
    assert confirmed.result is Result.ACCEPTED, confirmed
    (after,) = store.list_devices("alice")
    assert not after.pending and after.last_step == lib.T0 // 30
    assert store.users_with_usable_devices() == {"alice"}

    # The confirmation code cannot be used again to log in.
    assert verifier.verify("alice", code, CTX).result is Result.REPLAY
    # A second confirmation of the same device is refused.
    assert verifier.confirm_enrollment("alice", device.id, code, CTX).result is Result.ERROR

    mfa_env.clock.advance(30)
    assert verifier.verify("alice", lib.code(secret, mfa_env.clock()), CTX).result is Result.ACCEPTED
    assert "device_confirmed" in events(store)


def test_discarding_a_pending_enrollment(lib: type[Lib], store: Store, manager: DeviceManager, enroll: Enroll) -> None:
    pending = enroll(store, "alice", lib.secret_for(1), pending=True).device
    active = enroll(store, "alice", lib.secret_for(2)).device
    assert manager.discard_pending("alice", active.id, CTX) is False
    assert manager.discard_pending("alice", pending.id, CTX) is True
    assert [d.id for d in store.list_devices("alice")] == [active.id]


# ---------------------------------------------------------------------------
# Schema, initialisation and the key file.


def _set_user_version(path: Path, version: int) -> None:
    raw = sqlite3.connect(str(path), isolation_level=None)
    try:
        raw.execute(f"PRAGMA user_version = {int(version)}")
    finally:
        raw.close()


def test_a_newer_schema_is_refused(mfa_env: MfaEnv, settings: Settings) -> None:
    _set_user_version(mfa_env.db_path, schema.SCHEMA_VERSION + 1)
    with pytest.raises(SchemaError, match="newer"):
        Store.open(settings, clock=mfa_env.clock)
    with pytest.raises(SchemaError, match="newer"):
        Store.initialise(settings, clock=mfa_env.clock)
    # Refusing did not rewrite the version.
    raw = mfa_env.raw()
    try:
        assert raw.execute("PRAGMA user_version").fetchone()[0] == schema.SCHEMA_VERSION + 1
    finally:
        raw.close()


def test_a_missing_database_says_to_run_init(mfa_env: MfaEnv) -> None:
    settings = mfa_env.settings()
    with pytest.raises(SchemaError, match="mfa-admin init"):
        Store.open(settings, clock=mfa_env.clock)
    # Keys and folder present, database file absent.
    Store.initialise(settings, clock=mfa_env.clock)
    mfa_env.db_path.unlink()
    with pytest.raises(SchemaError, match="mfa-admin init"):
        Store.open(settings, clock=mfa_env.clock)
    assert not mfa_env.db_path.exists()  # open never creates


def test_an_uninitialised_database_is_refused(mfa_env: MfaEnv) -> None:
    settings = mfa_env.initialise()
    mfa_env.db_path.unlink()
    fd = os.open(mfa_env.db_path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.close(fd)
    with pytest.raises(SchemaError, match="mfa-admin init"):
        Store.open(settings, clock=mfa_env.clock)


def test_a_foreign_database_is_not_adopted(mfa_env: MfaEnv) -> None:
    settings = mfa_env.initialise()
    mfa_env.db_path.unlink()
    raw = sqlite3.connect(str(mfa_env.db_path))
    raw.execute("CREATE TABLE stuff (x)")
    raw.commit()
    raw.close()
    os.chmod(mfa_env.db_path, 0o600)
    with pytest.raises(SchemaError, match="not an mfaguard database"):
        Store.initialise(settings, clock=mfa_env.clock)


def test_initialise_is_idempotent_and_keeps_the_key(lib: type[Lib], mfa_env: MfaEnv, enroll: Enroll) -> None:
    settings = mfa_env.settings()
    first = Store.initialise(settings, clock=mfa_env.clock)
    assert first.created_key and first.created_database
    assert first.migrated_to == tuple(range(1, schema.SCHEMA_VERSION + 1))
    key = mfa_env.key_path.read_bytes()
    assert len(key) == 32
    assert (mfa_env.key_path.stat().st_mode & 0o777) == 0o600
    assert (mfa_env.db_path.stat().st_mode & 0o777) == 0o600
    assert (mfa_env.db_dir.stat().st_mode & 0o777) == 0o700
    with Store.open(settings, clock=mfa_env.clock) as store:
        enroll(store, "alice", lib.secret_for(1))

    again = Store.initialise(settings, clock=mfa_env.clock)

    assert not again.created_key and not again.created_database
    assert again.migrated_to == () and again.created_folders == ()
    assert mfa_env.key_path.read_bytes() == key
    with Store.open(settings, clock=mfa_env.clock) as store:
        assert [d.user for d in store.list_devices()] == ["alice"]
        assert [r.event for r in store.audit_rows()].count("init") == 1
        verifier = Verifier(settings, store=store, clock=mfa_env.clock)
        assert verifier.verify("alice", lib.code(lib.secret_for(1), lib.T0), CTX).accepted
        assert store.verify_audit().ok


@pytest.mark.parametrize("length", [0, 16, 31, 33, 64])
def test_a_key_file_of_the_wrong_length_is_refused(mfa_env: MfaEnv, length: int) -> None:
    settings = mfa_env.initialise()
    bad = os.urandom(length)
    mfa_env.key_path.write_bytes(bad)
    os.chmod(mfa_env.key_path, 0o600)
    with pytest.raises(KeyFileError, match="32"):
        Store.open(settings, clock=mfa_env.clock)
    with pytest.raises(KeyFileError):
        Store.initialise(settings, clock=mfa_env.clock)
    assert mfa_env.key_path.read_bytes() == bad  # never replaced


def test_initialise_does_not_replace_a_lost_key_of_an_existing_database(
    mfa_env: MfaEnv, enroll: Enroll, lib: type[Lib]
) -> None:
    """A new key beside a database sealed under the old one loses every secret: refuse, say restore."""
    settings = mfa_env.initialise()
    with Store.open(settings, clock=mfa_env.clock) as store:
        enroll(store, "alice", lib.secret_for(1))
    mfa_env.key_path.unlink()

    with pytest.raises(KeyFileError):
        Store.initialise(settings, clock=mfa_env.clock)

    assert not mfa_env.key_path.exists()


def test_a_missing_key_file_is_refused_by_open(mfa_env: MfaEnv) -> None:
    settings = mfa_env.initialise()
    mfa_env.key_path.unlink()
    with pytest.raises(KeyFileError, match="not found"):
        Store.open(settings, clock=mfa_env.clock)


def test_another_key_file_cannot_open_the_secrets(
    lib: type[Lib], mfa_env: MfaEnv, store: Store, enroll: Enroll
) -> None:
    enroll(store, "alice", lib.secret_for(1))
    store.close()
    mfa_env.key_path.write_bytes(os.urandom(32))
    with Store.open(store.settings, clock=mfa_env.clock) as other:
        decision = Verifier(other.settings, store=other, clock=mfa_env.clock).verify(
            "alice", lib.code(lib.secret_for(1), lib.T0), CTX
        )
        assert decision.result is Result.ERROR
        assert not other.verify_audit().ok  # the chain is keyed too


def test_a_stale_pending_enrollment_gives_its_slot_back(mfa_env: MfaEnv, lib: type[Lib]) -> None:
    """An enrollment killed before its code was confirmed must not hold a slot for ever."""
    from devicedb.manage import STALE_PENDING_SECONDS

    store = mfa_env.open(mfa_env.initialise("max_devices: 1\n"))
    manager = DeviceManager(store)
    first = manager.enroll_totp("alice", lib.CTX, pending=True)
    with pytest.raises(DeviceLimitError):
        manager.enroll_totp("alice", lib.CTX, pending=True)  # still fresh: it keeps its slot
    mfa_env.clock.advance(STALE_PENDING_SECONDS + 1)
    second = manager.enroll_totp("alice", lib.CTX, pending=True)
    assert [d.id for d in manager.list_devices("alice")] == [second.device.id]
    assert any(
        r.event == "device_removed" and r.device_id == first.device.id and "stale" in (r.reason or "")
        for r in store.audit_rows()
    )
