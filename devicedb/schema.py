"""Schema versions and migrations, applied through sqlite-utils.

The version lives in ``PRAGMA user_version``. The verify path never migrates:
it refuses an old or new schema, and ``mfa-admin init`` upgrades. sqlite-utils
is imported here only, because its import costs about 90 ms (it pulls in click
and dateutil) and the PAM module pays for every import on every login.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

from devicedb.errors import SchemaError

SCHEMA_VERSION = 1

_V1 = (
    """
CREATE TABLE devices (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    user TEXT NOT NULL,
    kind TEXT NOT NULL,
    label TEXT NOT NULL,
    algorithm TEXT,
    digits INTEGER,
    period INTEGER,
    secret BLOB,
    fingerprint TEXT UNIQUE,
    last_step INTEGER,
    next_counter INTEGER,
    sign_count INTEGER,
    drift INTEGER NOT NULL DEFAULT 0,
    params TEXT NOT NULL DEFAULT '{}',
    enabled INTEGER NOT NULL DEFAULT 1 CHECK (enabled IN (0, 1)),
    pending INTEGER NOT NULL DEFAULT 0 CHECK (pending IN (0, 1)),
    created_at REAL NOT NULL,
    last_used_at REAL,
    -- HOTP re-synchronisation: a code seen beyond the look-ahead, waiting for its successor.
    resync_counter INTEGER,
    resync_at REAL
)
""",
    """
CREATE TABLE backup_code_sets (
    user TEXT PRIMARY KEY,
    salt BLOB NOT NULL,
    created_at REAL NOT NULL,
    -- 10 for mfaguard's own codes; 8 for scratch codes migrated from google-authenticator.
    code_digits INTEGER NOT NULL DEFAULT 10
)
""",
    """
CREATE TABLE backup_codes (
    id INTEGER PRIMARY KEY,
    user TEXT NOT NULL REFERENCES backup_code_sets(user) ON DELETE CASCADE,
    digest BLOB NOT NULL,
    used_at REAL
)
""",
    """
CREATE TABLE lockout (
    user TEXT PRIMARY KEY,
    failures INTEGER NOT NULL DEFAULT 0,
    consecutive_failures INTEGER NOT NULL DEFAULT 0,
    locked_until REAL,
    hard_locked INTEGER NOT NULL DEFAULT 0,
    last_failure_at REAL,
    last_success_at REAL
)
""",
    """
CREATE TABLE audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ts REAL NOT NULL,
    event TEXT NOT NULL,
    user TEXT,
    device_id INTEGER,
    service TEXT,
    source TEXT,
    reason TEXT,
    detail TEXT NOT NULL DEFAULT '{}',
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL
)
""",
    """
CREATE TABLE tokens (
    serial TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    secret BLOB NOT NULL,
    fingerprint TEXT NOT NULL UNIQUE,
    algorithm TEXT,
    digits INTEGER,
    period INTEGER,
    counter INTEGER,
    params TEXT NOT NULL DEFAULT '{}',
    status TEXT NOT NULL DEFAULT 'unassigned' CHECK (status IN ('unassigned', 'assigned', 'revoked')),
    device_id INTEGER,
    user TEXT,
    imported_at REAL NOT NULL,
    source TEXT
)
""",
    """
CREATE TABLE auth_tickets (
    digest TEXT PRIMARY KEY,
    user TEXT NOT NULL,
    service TEXT NOT NULL,
    expires_at REAL NOT NULL
)
""",
    """
CREATE TRIGGER audit_append_only_update BEFORE UPDATE ON audit
BEGIN SELECT RAISE(ABORT, 'audit rows are append-only'); END;
""",
    """
CREATE TRIGGER audit_append_only_delete BEFORE DELETE ON audit
BEGIN SELECT RAISE(ABORT, 'audit rows are append-only'); END;
""",
)


def _migrate_to_1(conn: sqlite3.Connection) -> None:
    import sqlite_utils

    db = sqlite_utils.Database(conn)
    for statement in _V1:
        db.execute(statement)
    db.table("devices").create_index(["user"], index_name="devices_user")
    db.table("backup_codes").create_index(["user"], index_name="backup_codes_user")
    db.table("audit").create_index(["user", "ts"], index_name="audit_user_ts")
    db.table("audit").create_index(["ts"], index_name="audit_ts")


# Migration N takes a database at version N-1 to version N.
MIGRATIONS: dict[int, Callable[[sqlite3.Connection], None]] = {1: _migrate_to_1}


def current_version(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


def check_version(conn: sqlite3.Connection, path: str) -> None:
    version = current_version(conn)
    if version > SCHEMA_VERSION:
        raise SchemaError(
            f"database {path} has schema version {version}, newer than this mfaguard knows "
            f"(up to {SCHEMA_VERSION}); upgrade mfaguard, or restore a backup made for this version"
        )
    if version == 0:
        raise SchemaError(f"database {path} is not initialised; run `mfa-admin init`")
    if version < SCHEMA_VERSION:
        raise SchemaError(
            f"database {path} has schema version {version}; this mfaguard needs {SCHEMA_VERSION}. "
            "Run `mfa-admin init` to upgrade it"
        )


def migrate(conn: sqlite3.Connection, path: str) -> list[int]:
    """Bring the schema to SCHEMA_VERSION in one write transaction. Returns the versions applied."""
    applied: list[int] = []
    conn.execute("BEGIN IMMEDIATE")
    try:
        version = current_version(conn)
        if version > SCHEMA_VERSION:
            raise SchemaError(
                f"database {path} has schema version {version}, newer than this mfaguard knows "
                f"(up to {SCHEMA_VERSION}); upgrade mfaguard instead of downgrading the database"
            )
        if version == 0:
            names = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
            if names:
                raise SchemaError(
                    f"{path} holds tables ({', '.join(sorted(names))}) but no mfaguard schema version; "
                    "it is not an mfaguard database. Point database.path at a new file"
                )
        for target in range(version + 1, SCHEMA_VERSION + 1):
            MIGRATIONS[target](conn)
            conn.execute(f"PRAGMA user_version = {int(target)}")
            applied.append(target)
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return applied
