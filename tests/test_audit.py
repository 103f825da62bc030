"""The audit log: one row per decision and change, no secrets in it, and a chain that shows tampering."""

from __future__ import annotations

import base64
import logging
import sqlite3
from typing import TYPE_CHECKING

import pytest

from devicedb import audit
from devicedb.manage import DeviceManager
from devicedb.models import Context, Result
from devicedb.store import Store
from devicedb.verifier import Verifier

if TYPE_CHECKING:
    from conftest import Lib, MfaEnv

CTX = Context(service="test")

ADMIN = Context(service="mfa-admin", ruser="operator")
SSH = Context(service="sshd", remote_host="198.51.100.20", tty="ssh")
RADIUS = Context(service="radius", client="192.0.2.1", nas="vpn-1")


def test_decisions_and_changes_are_audited_with_the_right_events(lib: type[Lib], mfa_env: MfaEnv) -> None:
    settings = mfa_env.initialise("lockout:\n  max_failures: 3\n  hard_lock_after: 20\n")
    store = mfa_env.open(settings)
    manager = DeviceManager(store)
    verifier = mfa_env.verifier(store)
    secret = lib.secret_for(1)
    now = mfa_env.clock

    device = lib.enroll(store, "alice", secret, pending=True, context=ADMIN).device
    assert verifier.confirm_enrollment("alice", device.id, lib.code(secret, now()), ADMIN).accepted
    now.advance(30)
    assert verifier.verify("alice", lib.code(secret, now()), SSH).result is Result.ACCEPTED
    assert verifier.verify("alice", lib.code(secret, now()), SSH).result is Result.REPLAY
    manager.set_enabled("alice", device.id, False, ADMIN)
    manager.set_enabled("alice", device.id, True, ADMIN)
    manager.rename("alice", device.id, "phone", ADMIN)
    codes = manager.generate_backup_codes("alice", ADMIN)
    assert verifier.verify("alice", codes[0], RADIUS).result is Result.ACCEPTED
    assert verifier.verify("alice", "00000000", RADIUS).result is Result.BAD_CODE
    assert verifier.verify("alice", "00000000", RADIUS).result is Result.BAD_CODE
    assert verifier.verify("alice", "00000000", RADIUS).result is Result.BAD_CODE  # locks
    assert verifier.verify("alice", "00000000", RADIUS).result is Result.LOCKED
    manager.unlock("alice", ADMIN)
    manager.remove("alice", device.id, ADMIN)
    assert verifier.verify("bob", "123456", SSH).result is Result.NO_DEVICE

    rows = store.audit_rows()
    got = [(r.event, r.user, r.service, r.reason) for r in rows]
    assert got == [
        ("init", None, "mfa-admin", "schema version 1"),
        ("device_added", "alice", "mfa-admin", "pending confirmation"),
        ("device_confirmed", "alice", "mfa-admin", "confirmed with a code"),
        ("auth", "alice", "sshd", "accepted"),
        ("auth", "alice", "sshd", "replay: code already used"),
        ("device_disabled", "alice", "mfa-admin", "by administrator"),
        ("device_enabled", "alice", "mfa-admin", "by administrator"),
        ("device_renamed", "alice", "mfa-admin", None),
        ("backup_codes_generated", "alice", "mfa-admin", "new set"),
        ("backup_code_used", "alice", "radius", "backup code used"),
        ("auth", "alice", "radius", "accepted: backup code"),
        ("auth", "alice", "radius", "bad code"),
        ("auth", "alice", "radius", "bad code"),
        ("auth", "alice", "radius", "bad code"),
        ("lock", "alice", "radius", "lock"),
        ("auth", "alice", "radius", "locked"),
        ("unlock", "alice", "mfa-admin", "by administrator"),
        ("device_removed", "alice", "mfa-admin", "by administrator"),
        ("auth", "bob", "sshd", "no device enrolled"),
    ]
    assert {r.event for r in rows} <= audit.EVENTS
    assert [r.id for r in rows] == list(range(1, len(rows) + 1))
    # Where the attempt came from is recorded.
    accepted = rows[3]
    assert accepted.source == "198.51.100.20" and accepted.detail["tty"] == "ssh"
    assert accepted.device_id == device.id
    backup_auth = rows[10]
    assert backup_auth.source == "192.0.2.1" and backup_auth.detail["nas"] == "vpn-1"
    assert backup_auth.detail["remaining"] == 9
    assert rows[1].detail.get("ruser") == "operator"
    assert store.verify_audit().ok


def test_exempt_and_refused_names_are_audited(mfa_env: MfaEnv) -> None:
    store = mfa_env.open(mfa_env.initialise("enforcement:\n  exempt_users: [svc]\n"))
    verifier = mfa_env.verifier(store)
    verifier.requirement("svc", SSH)
    assert verifier.verify("bad\x00name", "123456", SSH).result is Result.ERROR
    rows = store.audit_rows()[1:]
    assert [(r.event, r.user) for r in rows] == [("auth", "svc"), ("auth", None)]
    assert rows[0].reason.startswith("exempt")
    assert rows[1].reason.startswith("refused user name")
    assert "\x00" not in rows[1].detail["name"]


def test_no_code_or_secret_appears_in_the_audit_table(
    lib: type[Lib], mfa_env: MfaEnv, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="mfaguard")
    mfa_env.clock.set(1_600_000_020)
    settings = mfa_env.initialise("lockout:\n  max_failures: 100\n  hard_lock_after: 100\n")
    store = mfa_env.open(settings)
    manager = DeviceManager(store)
    verifier = mfa_env.verifier(store)
    secret = lib.RFC_SEEDS["sha1"]
    other_secret = lib.secret_for(7)
    enrollment = lib.enroll(store, "alice", secret, digits=8, context=ADMIN)
    lib.enroll(store, "bob", other_secret, digits=8, context=ADMIN)
    codes = manager.generate_backup_codes("alice", ADMIN)
    tried: list[str] = []

    def attempt(user: str, response: str, context: Context = SSH) -> Result:
        tried.append(response)
        return verifier.verify(user, response, context).result

    right = lib.code(secret, mfa_env.clock(), digits=8)
    assert attempt("alice", "31415926") is Result.BAD_CODE
    assert attempt("alice", right) is Result.ACCEPTED
    assert attempt("alice", right, RADIUS) is Result.REPLAY
    assert attempt("alice", enrollment.secret_b32) is Result.BAD_CODE  # the user pasted the secret
    assert attempt("alice", codes[0]) is Result.ACCEPTED
    assert attempt("alice", codes[0].replace("-", "")) is Result.REPLAY
    assert attempt("alice", codes[1].replace("-", ""), RADIUS) is Result.ACCEPTED
    assert attempt("bob", codes[2]) is Result.BAD_CODE  # alice's code tried as bob
    mfa_env.clock.advance(30)
    next_code = lib.code(secret, mfa_env.clock(), digits=8)
    assert attempt("alice", next_code[::-1] if next_code[::-1] != next_code else "27182818") is Result.BAD_CODE
    assert attempt("alice", next_code) is Result.ACCEPTED
    assert attempt("bob", lib.code(other_secret, mfa_env.clock(), digits=8)) is Result.ACCEPTED
    assert verifier.confirm_enrollment("alice", enrollment.device.id, next_code, ADMIN).result is Result.ERROR
    manager.generate_backup_codes("alice", ADMIN)  # regenerated: the old ones are void
    assert attempt("alice", codes[3]) is Result.BAD_CODE

    forbidden = set(tried) | set(codes) | {c.replace("-", "") for c in codes}
    forbidden |= {enrollment.secret_b32, base64.b32encode(other_secret).decode().rstrip("=")}
    forbidden |= {secret.hex(), other_secret.hex(), secret.decode("latin-1")}
    assert all(len(f) >= 8 for f in forbidden)  # long enough not to turn up by chance in ids or hashes

    raw = mfa_env.raw()
    try:
        rows = raw.execute("SELECT * FROM audit").fetchall()
        columns = [d[0] for d in raw.execute("SELECT * FROM audit LIMIT 1").description]
    finally:
        raw.close()
    assert len(rows) > 15
    assert "reason" in columns and "detail" in columns
    for row in rows:
        for column, value in zip(columns, row, strict=True):
            text = value.decode("latin-1") if isinstance(value, bytes) else str(value)
            for item in forbidden:
                assert item not in text, f"audit row {row[0]} column {column} holds a code or secret"
    # Nor in the daemon log.
    for record in caplog.records:
        message = record.getMessage()
        for item in forbidden:
            assert item not in message


# ---------------------------------------------------------------------------
# The chain.


@pytest.fixture
def log_store(lib: type[Lib], mfa_env: MfaEnv) -> Store:
    """A store whose audit log holds 13 rows."""
    store = mfa_env.open(mfa_env.initialise("lockout:\n  max_failures: 100\n  hard_lock_after: 100\n"))
    verifier = Verifier(store.settings, store=store, clock=mfa_env.clock)
    lib.enroll(store, "alice", lib.secret_for(1))
    lib.enroll(store, "bob", lib.secret_for(2))
    for i in range(10):
        mfa_env.clock.advance(30)
        user, secret = ("alice", lib.secret_for(1)) if i % 2 else ("bob", lib.secret_for(2))
        response = lib.code(secret, mfa_env.clock()) if i % 3 else "99999999"
        verifier.verify(user, response, Context(service=f"svc{i}"))
    assert len(store.audit_rows()) == 13
    return store


def raw_tamper(mfa_env: MfaEnv, *statements: tuple[str, tuple[object, ...]], restore_triggers: bool = True) -> None:
    """Edit the log as an attacker with write access would: drop the append-only triggers, change rows,
    then (a careful attacker) put the triggers back, so that only the chain can tell."""
    raw = mfa_env.raw()
    try:
        triggers = [r[0] for r in raw.execute("SELECT sql FROM sqlite_master WHERE type = 'trigger'")]
        raw.execute("DROP TRIGGER audit_append_only_update")
        raw.execute("DROP TRIGGER audit_append_only_delete")
        for sql, args in statements:
            cur = raw.execute(sql, args)
            assert cur.rowcount >= 1, sql
        if restore_triggers:
            for sql in triggers:
                raw.execute(sql)
        raw.commit()
    finally:
        raw.close()


def test_dropped_triggers_are_reported(mfa_env: MfaEnv, log_store: Store) -> None:
    raw_tamper(mfa_env, ("UPDATE audit SET reason = reason WHERE id = 2", ()), restore_triggers=False)
    problems = [p.problem for p in log_store.verify_audit().problems]
    assert any("audit_append_only_update is missing" in p for p in problems)
    assert any("audit_append_only_delete is missing" in p for p in problems)


def test_an_emptied_log_is_reported(mfa_env: MfaEnv, log_store: Store) -> None:
    raw_tamper(mfa_env, ("DELETE FROM audit", ()), ("DELETE FROM sqlite_sequence WHERE name = 'audit'", ()))
    report = log_store.verify_audit()
    assert not report.ok
    assert any("the log is empty" in p.problem for p in report.problems)


def test_a_log_whose_oldest_rows_are_gone_is_reported(mfa_env: MfaEnv, log_store: Store) -> None:
    # Delete rows 1-3 and rewrite row 4 as if it were the first, with a genesis link: still caught.
    raw_tamper(mfa_env, ("DELETE FROM audit WHERE id < 4", ()))
    problems = log_store.verify_audit().problems
    assert any("not the init row" in p.problem or "missing" in p.problem for p in problems)


def test_an_untouched_log_verifies(log_store: Store) -> None:
    report = log_store.verify_audit()
    rows = log_store.audit_rows()
    assert report.ok
    assert report.problems == ()
    assert report.rows_checked == len(rows) == 13
    assert report.head_id == rows[-1].id == 13
    assert report.head_hash == rows[-1].hash
    # Each row links to the one before it.
    assert rows[0].prev_hash == audit.GENESIS_HASH
    assert all(b.prev_hash == a.hash for a, b in zip(rows, rows[1:], strict=False))


@pytest.mark.parametrize(
    ("column", "value"),
    [
        ("reason", "accepted"),
        ("user", "mallory"),
        ("event", "unlock"),
        ("ts", 1.0),
        ("service", "console"),
        ("source", "203.0.113.9"),
        ("device_id", 99),
        ("detail", '{"offset":0}'),
    ],
)
def test_an_edited_row_is_named(mfa_env: MfaEnv, log_store: Store, column: str, value: object) -> None:
    target = 7
    before = {r.id: r for r in log_store.audit_rows()}[target]
    assert getattr(before, column) != value
    raw_tamper(mfa_env, (f"UPDATE audit SET {column} = ? WHERE id = ?", (value, target)))

    report = log_store.verify_audit()

    assert not report.ok
    assert [p.row_id for p in report.problems] == [target]
    assert "the row was edited" in report.problems[0].problem


@pytest.mark.parametrize(
    ("column", "expression"),
    [
        ("reason", "CAST(reason AS BLOB)"),
        ("user", "CAST(user AS BLOB)"),
        ("ts", "'yesterday'"),
        ("hash", "CAST(hash AS BLOB)"),
        ("prev_hash", "CAST(prev_hash AS BLOB)"),
    ],
)
def test_a_row_edited_to_another_type_is_named_not_a_crash(
    mfa_env: MfaEnv, log_store: Store, column: str, expression: str
) -> None:
    """Tampering may store any SQLite type in any column; verify must still report, not raise."""
    target = 7
    raw_tamper(mfa_env, (f"UPDATE audit SET {column} = {expression} WHERE id = ?", (target,)))

    report = log_store.verify_audit()

    assert not report.ok
    assert target in {p.row_id for p in report.problems}
    assert min(p.row_id for p in report.problems) == target


def test_a_row_deleted_in_the_middle_is_named(mfa_env: MfaEnv, log_store: Store) -> None:
    raw_tamper(mfa_env, ("DELETE FROM audit WHERE id = ?", (6,)))

    report = log_store.verify_audit()

    assert not report.ok
    assert {p.row_id for p in report.problems} == {7}
    assert any("6" in p.problem and "missing" in p.problem for p in report.problems)
    assert report.rows_checked == 12


def test_swapped_rows_are_named(mfa_env: MfaEnv, log_store: Store) -> None:
    cols = "ts, event, user, device_id, service, source, reason, detail, prev_hash, hash"
    raw = mfa_env.raw()
    try:
        a = raw.execute(f"SELECT {cols} FROM audit WHERE id = 4").fetchone()
        b = raw.execute(f"SELECT {cols} FROM audit WHERE id = 9").fetchone()
    finally:
        raw.close()
    assignments = ", ".join(f"{c.strip()} = ?" for c in cols.split(","))
    raw_tamper(
        mfa_env,
        (f"UPDATE audit SET {assignments} WHERE id = 4", (*b,)),
        (f"UPDATE audit SET {assignments} WHERE id = 9", (*a,)),
    )

    report = log_store.verify_audit()

    assert not report.ok
    named = {p.row_id for p in report.problems}
    assert {4, 9} <= named
    assert min(named) == 4  # nothing before the first swapped row is blamed
    edited = {p.row_id for p in report.problems if "the row was edited" in p.problem}
    assert edited == {4, 9}


def test_deleting_the_newest_rows_is_detected(mfa_env: MfaEnv, log_store: Store) -> None:
    raw = mfa_env.raw()
    try:
        (seq,) = raw.execute("SELECT seq FROM sqlite_sequence WHERE name = 'audit'").fetchone()
    finally:
        raw.close()
    assert seq == 13
    raw_tamper(mfa_env, ("DELETE FROM audit WHERE id > ?", (10,)))

    report = log_store.verify_audit()

    assert not report.ok
    assert [p.row_id for p in report.problems] == [13]
    assert "11-13" in report.problems[0].problem
    assert report.head_id == 10


def test_new_rows_after_a_truncation_still_show_the_gap(mfa_env: MfaEnv, log_store: Store) -> None:
    raw_tamper(mfa_env, ("DELETE FROM audit WHERE id > ?", (10,)))
    DeviceManager(log_store).unlock("alice", ADMIN)  # appends row 14
    assert log_store.audit_rows()[-1].id == 14
    report = log_store.verify_audit()
    assert not report.ok
    assert 14 in {p.row_id for p in report.problems}


def test_triggers_refuse_update_and_delete(mfa_env: MfaEnv, log_store: Store) -> None:
    before = log_store.audit_rows()
    raw = mfa_env.raw()
    try:
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            raw.execute("UPDATE audit SET reason = 'nothing to see' WHERE id = 3")
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            raw.execute("DELETE FROM audit WHERE id = 3")
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            raw.execute("DELETE FROM audit")
    finally:
        raw.close()
    assert log_store.audit_rows() == before
    assert log_store.verify_audit().ok


def test_verify_chain_without_the_key_fails(log_store: Store) -> None:
    raw_rows = log_store.conn.execute(
        "SELECT id, ts, event, user, device_id, service, source, reason, detail, prev_hash, hash FROM audit ORDER BY id"
    ).fetchall()
    assert audit.verify_chain(raw_rows, log_store.keyring.audit_key, 13).ok
    assert not audit.verify_chain(raw_rows, b"\x00" * 32, 13).ok


def test_unknown_events_are_refused(log_store: Store) -> None:
    with pytest.raises(ValueError, match="unknown audit event"), log_store.transaction() as tx:
        tx.audit("login_ok", "alice", CTX)
    assert len(log_store.audit_rows()) == 13
