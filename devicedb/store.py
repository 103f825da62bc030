"""The device store: the only code that runs SQL against the mfaguard database.

Every state change and the audit row that records it share one ``BEGIN IMMEDIATE``
transaction. Replay state only moves forward through a conditional UPDATE whose
row count decides.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

from devicedb import audit, schema
from devicedb.errors import (
    DatabaseError,
    DeviceLimitError,
    DuplicateDeviceError,
    InvalidInput,
    KeyFileError,
    NotFound,
    SchemaError,
    UnsafePathError,
)
from devicedb.fsafety import check_file, check_folder, make_private_dir
from devicedb.keyring import Keyring
from devicedb.models import Advance, AuditRow, Context, Device, LockState
from devicedb.settings import LockoutSettings, Settings

Clock = Callable[[], float]

# The only columns an Advance may move.
_ADVANCE_FIELDS = frozenset({"last_step", "next_counter", "sign_count"})
_EXTRA_FIELDS = frozenset({"drift", "resync_counter", "resync_at"})
MAX_LABEL_CHARS = 64

_DEVICE_COLUMNS = (
    "id, user, kind, label, algorithm, digits, period, secret, last_step, next_counter, sign_count,"
    " drift, params, enabled, pending, created_at, last_used_at, resync_counter, resync_at"
)


def _device(r: tuple[Any, ...]) -> Device:
    try:
        params = json.loads(r[12]) if r[12] else {}
    except ValueError:
        params = {"unreadable": True}
    return Device(
        id=r[0],
        user=r[1],
        kind=r[2],
        label=r[3],
        algorithm=r[4],
        digits=r[5],
        period=r[6],
        sealed_secret=r[7],
        last_step=r[8],
        next_counter=r[9],
        sign_count=r[10],
        drift=r[11] or 0,
        params=params if isinstance(params, dict) else {"unreadable": True},
        enabled=bool(r[13]),
        pending=bool(r[14]),
        created_at=r[15],
        last_used_at=r[16],
        resync_counter=r[17],
        resync_at=r[18],
    )


_INVENTORY_COLUMNS = (
    "serial, kind, secret, algorithm, digits, period, counter, params, status, user, device_id, imported_at, source"
)


@dataclass(frozen=True)
class InventoryToken:
    serial: str
    kind: str
    sealed_secret: bytes
    algorithm: str | None
    digits: int | None
    period: int | None
    counter: int | None
    params: dict[str, Any]
    status: str
    user: str | None
    device_id: int | None
    imported_at: float
    source: str | None

    def public_dict(self) -> dict[str, Any]:
        return {
            "serial": self.serial,
            "kind": self.kind,
            "algorithm": self.algorithm,
            "digits": self.digits,
            "period": self.period,
            "counter": self.counter,
            "status": self.status,
            "user": self.user,
            "device_id": self.device_id,
            "imported_at": self.imported_at,
            "source": self.source,
            "weak": bool(self.params.get("weak")),
        }


def _token(r: tuple[Any, ...]) -> InventoryToken:
    try:
        params = json.loads(r[7]) if r[7] else {}
    except ValueError:
        params = {}
    return InventoryToken(r[0], r[1], bytes(r[2]), r[3], r[4], r[5], r[6], params, r[8], r[9], r[10], r[11], r[12])


def _uri_path(path: str) -> str:
    # SQLite URI filenames: '%', '?' and '#' would be read as escapes, the query and a fragment.
    return path.replace("%", "%25").replace("?", "%3f").replace("#", "%23")


def _ticket_digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", errors="replace")).hexdigest()


def check_label(label: str) -> str:
    if not isinstance(label, str) or not label.strip() or len(label) > MAX_LABEL_CHARS or not label.isprintable():
        raise InvalidInput(f"label {label!r} is not allowed; use 1 to {MAX_LABEL_CHARS} printable characters")
    return label.strip()


@dataclass(frozen=True)
class InitReport:
    created_folders: tuple[str, ...]
    created_key: bool
    created_database: bool
    migrated_to: tuple[int, ...]


class Tx:
    """One write transaction. Obtained from ``Store.transaction()``."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self.conn = store.conn
        self.keyring = store.keyring
        self.now = store.clock()
        self._savepoints = 0
        # The audit chain's head as of our last append: no one else writes while we hold the lock.
        self._audit_head: tuple[int, str] | None = None
        # Reads of a user's devices, lock state and unused backup codes, kept while nothing could have
        # changed them: a write names the user it changed (``_wrote``), and any change the connection
        # counts that no write named (``conn.total_changes``) throws every cached read away.
        self._devices: dict[str, list[Device]] = {}
        self._locks: dict[str, LockState] = {}
        self._backup_left: dict[str, int] = {}
        self._accounted_changes = self.conn.total_changes

    def _cache_valid(self) -> None:
        if self.conn.total_changes != self._accounted_changes:
            self._forget()

    def _forget(self) -> None:
        self._devices.clear()
        self._locks.clear()
        self._backup_left.clear()
        self._accounted_changes = self.conn.total_changes

    def _wrote(self, user: str | None) -> None:
        """After a write that changed only this user's devices, lock state or backup codes (or, for
        None, only rows no cached read covers: the audit log)."""
        if self.conn.total_changes == self._accounted_changes:
            return
        if user is not None:
            self._devices.pop(user, None)
            self._locks.pop(user, None)
            self._backup_left.pop(user, None)
        self._accounted_changes = self.conn.total_changes

    def prefetch(self, users: list[str]) -> None:
        """Read several users' devices, lock states and backup-code counts in three statements
        (a group commit's attempts), so that each attempt's own reads hit the cache."""
        self._cache_valid()
        wanted = sorted({u for u in users if u not in self._devices})
        if not wanted:
            return
        # The names travel as one JSON array, so each query is one statement text whatever the batch size
        # (an IN list of N placeholders would be a new statement to prepare for every N).
        names = (json.dumps(wanted),)
        devices: dict[str, list[Device]] = {u: [] for u in wanted}
        for r in self.conn.execute(
            f"SELECT {_DEVICE_COLUMNS} FROM devices WHERE user IN (SELECT value FROM json_each(?)) ORDER BY user, id",
            names,
        ):
            devices[r[1]].append(_device(r))
        locks = {u: LockState() for u in wanted}
        for r in self.conn.execute(
            "SELECT user, failures, consecutive_failures, locked_until, hard_locked, last_failure_at,"
            " last_success_at FROM lockout WHERE user IN (SELECT value FROM json_each(?))",
            names,
        ):
            locks[r[0]] = LockState(r[1], r[2], r[3], bool(r[4]), r[5], r[6])
        left = dict.fromkeys(wanted, 0)
        for user, n in self.conn.execute(
            "SELECT user, COUNT(*) FROM backup_codes WHERE user IN (SELECT value FROM json_each(?))"
            " AND used_at IS NULL GROUP BY user",
            names,
        ):
            left[user] = int(n)
        self._devices.update(devices)
        self._locks.update(locks)
        self._backup_left.update(left)

    @contextmanager
    def savepoint(self) -> Iterator[None]:
        """A nested unit inside this transaction: rolled back alone if it raises."""
        # One name for every level: SQLite resolves a name to the innermost savepoint holding it,
        # and one statement text keeps the statement cache from filling with sp1, sp2, ...
        self._savepoints += 1
        name = "mfaguard_savepoint"
        self.conn.execute(f"SAVEPOINT {name}")
        try:
            yield
        except BaseException:
            self.conn.execute(f"ROLLBACK TO {name}")
            self.conn.execute(f"RELEASE {name}")
            self._audit_head = None  # a rolled-back append is no longer the head
            self._forget()  # nor are reads made since
            raise
        self.conn.execute(f"RELEASE {name}")

    # -- audit -------------------------------------------------------------
    def audit(
        self,
        event: str,
        user: str | None,
        context: Context,
        *,
        reason: str | None = None,
        device_id: int | None = None,
        detail: dict[str, Any] | None = None,
    ) -> int:
        merged = dict(context.detail())
        merged.update(detail or {})
        row_id, digest = audit.append(
            self.conn,
            self.keyring.audit_key,
            head=self._audit_head,
            ts=self.now,
            event=event,
            user=user,
            device_id=device_id,
            service=context.service,
            source=context.source,
            reason=reason,
            detail=merged,
        )
        self._audit_head = (row_id, digest)
        self._wrote(None)
        return row_id

    # -- devices -----------------------------------------------------------
    def devices(self, user: str) -> list[Device]:
        self._cache_valid()
        cached = self._devices.get(user)
        if cached is None:
            cur = self.conn.execute(f"SELECT {_DEVICE_COLUMNS} FROM devices WHERE user = ? ORDER BY id", (user,))
            cached = self._devices[user] = [_device(r) for r in cur]
        return list(cached)

    def device(self, user: str, device_id: int) -> Device:
        r = self.conn.execute(
            f"SELECT {_DEVICE_COLUMNS} FROM devices WHERE id = ? AND user = ?", (device_id, user)
        ).fetchone()
        if r is None:
            raise NotFound(f"user {user!r} has no device {device_id}; see `mfa-admin devices list {user}`")
        return _device(r)

    def open_secret(self, device: Device) -> bytes:
        if device.sealed_secret is None:
            raise InvalidInput(f"device {device.id} has no secret")
        return self.keyring.open(device.id, device.user, device.sealed_secret)

    def insert_device(
        self,
        *,
        user: str,
        kind: str,
        label: str,
        secret: bytes | None,
        fingerprint_domain: str,
        fingerprint_material: bytes,
        max_devices: int,
        algorithm: str | None = None,
        digits: int | None = None,
        period: int | None = None,
        next_counter: int | None = None,
        sign_count: int | None = None,
        params: dict[str, Any] | None = None,
        pending: bool = False,
    ) -> int:
        """Insert a device, enforcing the limit and uniqueness in this same transaction."""
        label = check_label(label)
        (count,) = self.conn.execute("SELECT COUNT(*) FROM devices WHERE user = ?", (user,)).fetchone()
        if count >= max_devices:
            raise DeviceLimitError(
                f"user {user!r} already has {count} devices, the maximum (max_devices = {max_devices}); "
                f"remove one first with `mfa-admin devices remove {user} ID`"
            )
        fingerprint = self.keyring.fingerprint(fingerprint_domain, fingerprint_material)
        if self.conn.execute("SELECT 1 FROM devices WHERE fingerprint = ?", (fingerprint,)).fetchone():
            raise DuplicateDeviceError("this secret or credential is already enrolled; each device must be unique")
        cur = self.conn.execute(
            "INSERT INTO devices (user, kind, label, algorithm, digits, period, fingerprint, next_counter,"
            " sign_count, params, pending, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                user,
                kind,
                label,
                algorithm,
                digits,
                period,
                fingerprint,
                next_counter,
                sign_count,
                json.dumps(params or {}, sort_keys=True),
                int(pending),
                self.now,
            ),
        )
        device_id = int(cur.lastrowid or 0)
        if secret is not None:
            # The seal binds the id, known only now, and the user.
            sealed = self.keyring.seal(device_id, user, secret)
            self.conn.execute("UPDATE devices SET secret = ? WHERE id = ?", (sealed, device_id))
        return device_id

    def advance(self, device: Device, advance: Advance) -> bool:
        """Move replay state forward. False when another process got there first."""
        if advance.field not in _ADVANCE_FIELDS or not set(advance.extra) <= _EXTRA_FIELDS:
            raise ValueError(f"cannot advance {advance.field}")
        assignments = [f"{advance.field} = ?", "last_used_at = ?"]
        args: list[Any] = [advance.new_value, self.now]
        for name, value in sorted(advance.extra.items()):
            assignments.append(f"{name} = ?")
            args.append(value)
        args += [device.id, device.user, advance.new_value]
        cur = self.conn.execute(
            f"UPDATE devices SET {', '.join(assignments)} WHERE id = ? AND user = ? AND enabled = 1"
            f" AND pending = 0 AND ({advance.field} IS NULL OR {advance.field} < ?)",
            args,
        )
        self._wrote(device.user)
        return cur.rowcount == 1

    def touch_device(self, device: Device) -> None:
        self.conn.execute(
            "UPDATE devices SET last_used_at = ? WHERE id = ? AND user = ?", (self.now, device.id, device.user)
        )
        self._wrote(device.user)

    def note_state(self, device: Device, note: dict[str, int | float | None]) -> None:
        """Record state a failed attempt leaves behind (an HOTP code awaiting its successor)."""
        if not note or not set(note) <= _EXTRA_FIELDS:
            raise ValueError(f"cannot note {sorted(note)}")
        names = sorted(note)
        self.conn.execute(
            f"UPDATE devices SET {', '.join(f'{n} = ?' for n in names)} WHERE id = ? AND user = ?",
            [note[n] for n in names] + [device.id, device.user],
        )
        self._wrote(device.user)

    def set_clock(self, device: Device, last_step: int, drift: int) -> bool:
        """An administrator's resync of a hardware TOTP token: new drift, replay state forward only."""
        cur = self.conn.execute(
            "UPDATE devices SET last_step = ?, drift = ? WHERE id = ? AND user = ?"
            " AND (last_step IS NULL OR last_step < ?)",
            (last_step, drift, device.id, device.user, last_step),
        )
        return cur.rowcount == 1

    def set_counter(self, device: Device, next_counter: int) -> bool:
        """An administrator's resync: set the next expected counter, forward only."""
        cur = self.conn.execute(
            "UPDATE devices SET next_counter = ?, resync_counter = NULL, resync_at = NULL"
            " WHERE id = ? AND user = ? AND (next_counter IS NULL OR next_counter < ?)",
            (next_counter, device.id, device.user, next_counter),
        )
        return cur.rowcount == 1

    def confirm_device(self, device: Device, advance: Advance) -> bool:
        cur = self.conn.execute(
            f"UPDATE devices SET pending = 0, {advance.field} = ? WHERE id = ? AND user = ? AND pending = 1",
            (advance.new_value, device.id, device.user),
        )
        return cur.rowcount == 1

    def set_enabled(self, user: str, device_id: int, enabled: bool) -> bool:
        """Returns False when the device already was in that state."""
        self.device(user, device_id)
        cur = self.conn.execute(
            "UPDATE devices SET enabled = ? WHERE id = ? AND user = ? AND enabled != ?",
            (int(enabled), device_id, user, int(enabled)),
        )
        return cur.rowcount == 1

    def rename(self, user: str, device_id: int, label: str) -> str:
        label = check_label(label)
        self.device(user, device_id)
        self.conn.execute("UPDATE devices SET label = ? WHERE id = ? AND user = ?", (label, device_id, user))
        return label

    def remove(self, user: str, device_id: int) -> Device:
        device = self.device(user, device_id)
        serial = device.params.get("serial")
        if isinstance(serial, str):
            # A token from the inventory keeps its replay state when its device goes, however it goes:
            # handed out again, its used codes must stay used.
            self.set_token_state(serial, device.next_counter, {"last_step": device.last_step, "drift": device.drift})
        self.conn.execute("DELETE FROM devices WHERE id = ? AND user = ?", (device_id, user))
        return device

    # -- token inventory -------------------------------------------------------
    def insert_token(
        self,
        *,
        serial: str,
        kind: str,
        secret: bytes,
        fingerprint_domain: str,
        fingerprint_material: bytes,
        algorithm: str | None,
        digits: int | None,
        period: int | None,
        counter: int | None,
        params: dict[str, Any],
        source: str,
        where: str,
    ) -> None:
        fingerprint = self.keyring.fingerprint(fingerprint_domain, fingerprint_material)
        if self.conn.execute("SELECT 1 FROM tokens WHERE serial = ?", (serial,)).fetchone():
            raise DuplicateDeviceError(f"{where}: serial {serial} is already in the inventory")
        if self.conn.execute(
            "SELECT 1 FROM tokens WHERE fingerprint = ? UNION SELECT 1 FROM devices WHERE fingerprint = ?",
            (fingerprint, fingerprint),
        ).fetchone():
            raise DuplicateDeviceError(f"{where}: the seed of serial {serial} is already imported or enrolled")
        self.conn.execute(
            "INSERT INTO tokens (serial, kind, secret, fingerprint, algorithm, digits, period, counter, params,"
            " imported_at, source) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                serial,
                kind,
                self.keyring.seal_token(serial, secret),
                fingerprint,
                algorithm,
                digits,
                period,
                counter,
                json.dumps(params, sort_keys=True),
                self.now,
                source,
            ),
        )

    def tokens(self, status: str | None = None) -> list[InventoryToken]:
        sql = f"SELECT {_INVENTORY_COLUMNS} FROM tokens"
        args: tuple[Any, ...] = ()
        if status is not None:
            sql += " WHERE status = ?"
            args = (status,)
        return [_token(r) for r in self.conn.execute(sql + " ORDER BY serial", args)]

    def token(self, serial: str) -> InventoryToken:
        r = self.conn.execute(f"SELECT {_INVENTORY_COLUMNS} FROM tokens WHERE serial = ?", (serial,)).fetchone()
        if r is None:
            raise NotFound(f"no token with serial {serial!r} in the inventory; see `mfa-admin tokens list`")
        return _token(r)

    def open_token_secret(self, token: InventoryToken) -> bytes:
        return self.keyring.open_token(token.serial, token.sealed_secret)

    def set_token_state(self, serial: str, counter: int | None, state: dict[str, Any]) -> None:
        """Keep a token's replay state (HOTP/Yubico counter, TOTP last step and drift) while it is in stock."""
        row = self.conn.execute("SELECT params FROM tokens WHERE serial = ?", (serial,)).fetchone()
        params = json.loads(row[0]) if row and row[0] else {}
        params.update({k: v for k, v in state.items() if v is not None})
        self.conn.execute(
            "UPDATE tokens SET counter = COALESCE(?, counter), params = ? WHERE serial = ?",
            (counter, json.dumps(params, sort_keys=True), serial),
        )

    def restore_replay_state(self, device_id: int, *, last_step: Any, drift: int) -> None:
        if last_step is None and not drift:
            return
        self.conn.execute("UPDATE devices SET last_step = ?, drift = ? WHERE id = ?", (last_step, drift, device_id))

    def set_token_status(self, serial: str, status: str, user: str | None, device_id: int | None) -> None:
        self.conn.execute(
            "UPDATE tokens SET status = ?, user = ?, device_id = ? WHERE serial = ?", (status, user, device_id, serial)
        )

    # -- backup codes --------------------------------------------------------
    def backup_salt(self, user: str) -> bytes | None:
        r = self.conn.execute("SELECT salt FROM backup_code_sets WHERE user = ?", (user,)).fetchone()
        return bytes(r[0]) if r else None

    def replace_backup_codes(self, user: str, salt: bytes, digests: list[bytes], code_digits: int = 10) -> int:
        """Void the old set and store the new one. Returns how many unused codes were voided."""
        (voided,) = self.conn.execute(
            "SELECT COUNT(*) FROM backup_codes WHERE user = ? AND used_at IS NULL", (user,)
        ).fetchone()
        self.conn.execute("DELETE FROM backup_codes WHERE user = ?", (user,))
        self.conn.execute("DELETE FROM backup_code_sets WHERE user = ?", (user,))
        self.conn.execute(
            "INSERT INTO backup_code_sets (user, salt, created_at, code_digits) VALUES (?, ?, ?, ?)",
            (user, salt, self.now, code_digits),
        )
        self.conn.executemany("INSERT INTO backup_codes (user, digest) VALUES (?, ?)", [(user, d) for d in digests])
        return int(voided)

    def use_backup_code(self, user: str, salt: bytes, candidate: bytes) -> str | None:
        """Consume the unused code whose digest is ``candidate``, computed under ``salt``.

        Returns "used" on success, "replay" when it matches a code already used, else None.
        """
        current = self.backup_salt(user)
        if current is None or not hmac.compare_digest(current, salt):
            return None  # no set, or it was regenerated since the digest was computed
        hit = None
        spent = False
        for code_id, stored, used_at in self.conn.execute(
            "SELECT id, digest, used_at FROM backup_codes WHERE user = ? ORDER BY id", (user,)
        ).fetchall():
            if hmac.compare_digest(bytes(stored), candidate):
                if used_at is None:
                    hit = code_id
                else:
                    spent = True
        if hit is None:
            return "replay" if spent else None
        cur = self.conn.execute("UPDATE backup_codes SET used_at = ? WHERE id = ? AND used_at IS NULL", (self.now, hit))
        self._wrote(user)
        return "used" if cur.rowcount == 1 else "replay"

    def backup_code_digits(self, user: str) -> int | None:
        r = self.conn.execute("SELECT code_digits FROM backup_code_sets WHERE user = ?", (user,)).fetchone()
        return int(r[0]) if r else None

    def backup_codes_left(self, user: str) -> int:
        self._cache_valid()
        cached = self._backup_left.get(user)
        if cached is None:
            (n,) = self.conn.execute(
                "SELECT COUNT(*) FROM backup_codes WHERE user = ? AND used_at IS NULL", (user,)
            ).fetchone()
            cached = self._backup_left[user] = int(n)
        return cached

    def has_backup_codes(self, user: str) -> bool:
        return self.backup_codes_left(user) > 0

    # -- auth tickets ----------------------------------------------------------
    def issue_ticket(self, user: str, service: str, lifetime: float) -> str:
        """A one-time proof that this user passed the second factor for this service just now."""
        token = secrets.token_urlsafe(32)
        self.conn.execute("DELETE FROM auth_tickets WHERE expires_at <= ?", (self.now,))
        self.conn.execute(
            "INSERT INTO auth_tickets (digest, user, service, expires_at) VALUES (?, ?, ?, ?)",
            (_ticket_digest(token), user, service, self.now + lifetime),
        )
        return token

    def redeem_ticket(self, user: str, service: str, token: str) -> bool:
        cur = self.conn.execute(
            "DELETE FROM auth_tickets WHERE digest = ? AND user = ? AND service = ? AND expires_at > ?",
            (_ticket_digest(token), user, service, self.now),
        )
        return cur.rowcount == 1

    # -- lockout -------------------------------------------------------------
    def lock_state(self, user: str) -> LockState:
        self._cache_valid()
        cached = self._locks.get(user)
        if cached is None:
            r = self.conn.execute(
                "SELECT failures, consecutive_failures, locked_until, hard_locked, last_failure_at, last_success_at"
                " FROM lockout WHERE user = ?",
                (user,),
            ).fetchone()
            cached = LockState() if r is None else LockState(r[0], r[1], r[2], bool(r[3]), r[4], r[5])
            self._locks[user] = cached
        return cached

    def record_failure(self, user: str, rules: LockoutSettings) -> str | None:
        """Count one failure. Returns 'lock' or 'hard_lock' when this failure locks the user."""
        state = self.lock_state(user)
        failures = state.failures + 1
        consecutive = state.consecutive_failures + 1
        locked_until = state.locked_until
        hard = state.hard_locked
        outcome = None
        if consecutive >= rules.hard_lock_after:
            hard = True
            outcome = "hard_lock"
        elif failures >= rules.max_failures:
            locked_until = self.now + rules.lock_seconds
            failures = 0
            outcome = "lock"
        self.conn.execute(
            "INSERT INTO lockout (user, failures, consecutive_failures, locked_until, hard_locked, last_failure_at)"
            " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (user) DO UPDATE SET failures = excluded.failures,"
            " consecutive_failures = excluded.consecutive_failures, locked_until = excluded.locked_until,"
            " hard_locked = excluded.hard_locked, last_failure_at = excluded.last_failure_at",
            (user, failures, consecutive, locked_until, int(hard), self.now),
        )
        self._wrote(user)
        return outcome

    def record_success(self, user: str) -> None:
        self.conn.execute(
            "INSERT INTO lockout (user, last_success_at) VALUES (?, ?) ON CONFLICT (user) DO UPDATE SET"
            " failures = 0, consecutive_failures = 0, last_success_at = excluded.last_success_at",
            (user, self.now),
        )
        self._wrote(user)

    def unlock(self, user: str) -> LockState:
        before = self.lock_state(user)
        self.conn.execute(
            "UPDATE lockout SET failures = 0, consecutive_failures = 0, locked_until = NULL, hard_locked = 0"
            " WHERE user = ?",
            (user,),
        )
        return before


class Store:
    """An open mfaguard database and its sealing key."""

    def __init__(self, conn: sqlite3.Connection, keyring: Keyring, settings: Settings, clock: Clock) -> None:
        self.conn = conn
        self.keyring = keyring
        self.settings = settings
        self.clock = clock
        self._lock = threading.RLock()
        # Taken around every write transaction when set: several server processes that share this
        # database wait for each other in the kernel rather than in SQLite's sleeping busy handler.
        self.write_gate: Callable[[], AbstractContextManager[None]] | None = None

    # -- opening -------------------------------------------------------------
    @staticmethod
    def _connect(settings: Settings, *, create: bool) -> sqlite3.Connection:
        db = settings.database
        mode = "rwc" if create else "rw"
        try:
            conn = sqlite3.connect(
                f"file:{_uri_path(db.path)}?mode={mode}",
                uri=True,
                timeout=db.busy_timeout_ms / 1000,
                isolation_level=None,
                check_same_thread=False,
            )
            conn.execute(f"PRAGMA busy_timeout = {int(db.busy_timeout_ms)}")
            journal = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(journal).lower() != "wal":
                raise DatabaseError(f"database {db.path} could not be switched to WAL mode (got {journal})")
            conn.execute(f"PRAGMA synchronous = {'FULL' if db.synchronous == 'full' else 'NORMAL'}")
            conn.execute("PRAGMA foreign_keys = ON")
            conn.execute("PRAGMA trusted_schema = OFF")
            # Savepoint sub-journals (the verify path's per-attempt savepoints) in memory, not temp files.
            conn.execute("PRAGMA temp_store = MEMORY")
            # A page cache that holds a large site's devices and lockout rows (SQLite's default is 2 MiB,
            # about 8,000 devices): a long-lived server then reads them from memory, not with a pread each.
            # It grows only as pages are read, so a short-lived login process pays nothing for it.
            conn.execute("PRAGMA cache_size = -65536")
        except sqlite3.DatabaseError as exc:
            raise DatabaseError(f"database {db.path} cannot be opened: {exc}") from None
        return conn

    @classmethod
    def open(cls, settings: Settings, *, clock: Clock = time.time) -> Store:
        """Open an initialised database for use. Never creates or migrates anything."""
        path = settings.database.path
        try:
            check_file(path, "database")
        except FileNotFoundError:
            raise SchemaError(f"database {path} does not exist; run `mfa-admin init`") from None
        keyring = Keyring.load(settings.database.key_file)
        conn = cls._connect(settings, create=False)
        try:
            schema.check_version(conn, path)
        except BaseException:
            conn.close()
            raise
        return cls(conn, keyring, settings, clock)

    @classmethod
    def initialise(
        cls, settings: Settings, *, clock: Clock = time.time, allow_new_database_with_old_key: bool = False
    ) -> InitReport:
        """Create folders, key file and database with safe modes, or upgrade them. Idempotent."""
        db_path = settings.database.path
        key_path = settings.database.key_file
        created_folders = []
        for folder, what in ((os.path.dirname(db_path), "database folder"), (os.path.dirname(key_path), "key folder")):
            if not os.path.lexists(folder):
                created_folders.append(folder)
            make_private_dir(folder, what)
        if not os.path.lexists(key_path) and os.path.lexists(db_path) and os.path.getsize(db_path) > 0:
            # A new key would make every sealed secret in this database unreadable, for good.
            raise KeyFileError(
                f"key file {key_path} is missing but database {db_path} exists: restore the key file from "
                "backup. `mfa-admin init` creates a key only for a new database"
            )
        db_is_new = not os.path.lexists(db_path) or (os.path.isfile(db_path) and os.path.getsize(db_path) == 0)
        if os.path.lexists(key_path) and db_is_new and not allow_new_database_with_old_key:
            # The key outlives the database it was made with: an empty or missing database beside
            # it is far more likely lost than new. Starting afresh silently would hide that.
            raise SchemaError(
                f"database {db_path} is missing or empty, but key file {key_path} already exists: the database "
                "may have been lost or emptied. Restore it from backup; to start a new, empty one on purpose, "
                "run `mfa-admin init --force`"
            )
        created_key = Keyring.create(key_path)
        keyring = Keyring.load(key_path)
        created_db = not os.path.lexists(db_path)
        if created_db:
            fd = os.open(db_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            os.fchmod(fd, 0o600)
            os.close(fd)
        check_folder(os.path.dirname(db_path), "database folder")
        check_file(db_path, "database")
        conn = cls._connect(settings, create=False)
        try:
            applied = schema.migrate(conn, db_path)
            store = cls(conn, keyring, settings, clock)
            if applied:
                with store.transaction() as tx:
                    event = "init" if created_db or applied[0] == 1 else "migrate"
                    tx.audit(
                        event,
                        None,
                        Context(service="mfa-admin"),
                        reason=f"schema version {applied[-1]}",
                    )
        finally:
            conn.close()
        return InitReport(tuple(created_folders), created_key, created_db, tuple(applied))

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- transactions --------------------------------------------------------
    @contextmanager
    def transaction(self) -> Iterator[Tx]:
        """A write transaction: BEGIN IMMEDIATE ... COMMIT, rolled back on any exception."""
        with self._lock, (self.write_gate or nullcontext)():
            try:
                self.conn.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                raise DatabaseError(f"database {self.settings.database.path} is busy or locked: {exc}") from None
            try:
                yield Tx(self)
            except BaseException:
                self.conn.execute("ROLLBACK")
                raise
            try:
                self.conn.execute("COMMIT")
            except sqlite3.DatabaseError as exc:
                if self.conn.in_transaction:
                    self.conn.execute("ROLLBACK")
                raise DatabaseError(f"database {self.settings.database.path}: commit failed: {exc}") from None

    # -- read-only views for the admin tool --------------------------------------
    def list_devices(self, user: str | None = None) -> list[Device]:
        with self._lock:
            if user is None:
                cur = self.conn.execute(f"SELECT {_DEVICE_COLUMNS} FROM devices ORDER BY user, id")
            else:
                cur = self.conn.execute(f"SELECT {_DEVICE_COLUMNS} FROM devices WHERE user = ? ORDER BY id", (user,))
            return [_device(r) for r in cur]

    def users_with_usable_devices(self) -> set[str]:
        with self._lock:
            cur = self.conn.execute("SELECT DISTINCT user FROM devices WHERE enabled = 1 AND pending = 0")
            return {r[0] for r in cur}

    def lock_state(self, user: str) -> LockState:
        with self.transaction() as tx:
            return tx.lock_state(user)

    def backup_set(self, user: str) -> tuple[bytes, int] | None:
        """The salt and code length of the user's current set, read without taking the write lock."""
        with self._lock:
            r = self.conn.execute("SELECT salt, code_digits FROM backup_code_sets WHERE user = ?", (user,)).fetchone()
            return (bytes(r[0]), int(r[1])) if r else None

    def backup_sets(self, users: list[str]) -> dict[str, tuple[bytes, int]]:
        """``backup_set`` for several users in one statement (a group commit's attempts)."""
        found: dict[str, tuple[bytes, int]] = {}
        with self._lock:
            for user, salt, digits in self.conn.execute(
                "SELECT user, salt, code_digits FROM backup_code_sets WHERE user IN (SELECT value FROM json_each(?))",
                (json.dumps(sorted(set(users))),),
            ):
                found[user] = (bytes(salt), int(digits))
        return found

    def backup_codes_left(self, user: str) -> int:
        with self.transaction() as tx:
            return tx.backup_codes_left(user)

    def audit_rows(
        self,
        *,
        user: str | None = None,
        since: float | None = None,
        after_id: int | None = None,
        limit: int | None = None,
    ) -> list[AuditRow]:
        with self._lock:
            return list(audit.rows(self.conn, user=user, since=since, after_id=after_id, limit=limit))

    def verify_audit(self) -> audit.ChainReport:
        with self._lock:
            self.conn.execute("BEGIN")  # one consistent snapshot of the whole chain
            try:
                return audit.verify(self.conn, self.keyring.audit_key)
            finally:
                self.conn.execute("ROLLBACK")


__all__ = ["InitReport", "Store", "Tx", "UnsafePathError"]
