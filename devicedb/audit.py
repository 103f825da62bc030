"""The tamper-evident audit chain.

Each row's hash is HMAC-SHA256, under a key derived from the sealing key, over
the previous row's hash and this row's id and contents. Editing a row breaks its
hash; deleting one leaves a gap in the ids and breaks the next row's link;
swapping two rows breaks both. Without the key file nobody can rebuild the chain.
Truncating the newest rows can only be caught against a copy held elsewhere: keep
the `audit verify` head hash or the JSON-lines export off the host.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import sqlite3
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from devicedb.models import AuditRow

GENESIS_HASH = "0" * 64

# The events the core writes. Front ends add none of their own.
EVENTS = frozenset(
    {
        "auth",
        "device_added",
        "device_confirmed",
        "device_removed",
        "device_enabled",
        "device_disabled",
        "device_renamed",
        "device_resynced",
        "tokens_imported",
        "token_assigned",
        "token_unassigned",
        "token_revoked",
        "backup_codes_generated",
        "backup_code_used",
        "lock",
        "unlock",
        "init",
        "migrate",
    }
)


# Made once: json.dumps with options builds a new encoder on every call.
_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)
_COMPACT = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


def canonical_detail(detail: dict[str, Any] | None) -> str:
    return _CANONICAL.encode(detail or {})


def row_hash(
    key: bytes,
    prev_hash: str,
    row_id: int,
    ts: float,
    event: str,
    user: str | None,
    device_id: int | None,
    service: str | None,
    source: str | None,
    reason: str | None,
    detail_json: str,
) -> str:
    body = _COMPACT.encode([row_id, repr(float(ts)), event, user, device_id, service, source, reason, detail_json])
    inner, outer = _pads(key)
    inner = inner.copy()
    inner.update(prev_hash.encode() + b"\n" + body.encode("utf-8"))
    outer = outer.copy()
    outer.update(inner.digest())
    digest: str = outer.hexdigest()  # HMAC-SHA256 (RFC 2104) with the pads hashed once per key
    return digest


@functools.lru_cache(maxsize=4)
def _pads(key: bytes) -> tuple[Any, Any]:
    padded = (hashlib.sha256(key).digest() if len(key) > 64 else key).ljust(64, b"\0")
    return hashlib.sha256(padded.translate(_XOR_36)), hashlib.sha256(padded.translate(_XOR_5C))


_XOR_36 = bytes(b ^ 0x36 for b in range(256))
_XOR_5C = bytes(b ^ 0x5C for b in range(256))


def append(
    conn: sqlite3.Connection,
    key: bytes,
    *,
    ts: float,
    event: str,
    user: str | None,
    device_id: int | None = None,
    service: str | None = None,
    source: str | None = None,
    reason: str | None = None,
    detail: dict[str, Any] | None = None,
    head: tuple[int, str] | None = None,
) -> tuple[int, str]:
    """Append one row; returns its id and hash, the head of the chain for the next append.

    The caller holds the write transaction (BEGIN IMMEDIATE), so the head it passes, read by
    ``chain_head`` or returned by the previous append in the same transaction, is still current.
    """
    if event not in EVENTS:
        raise ValueError(f"unknown audit event {event!r}")
    prev_id, prev_hash = head if head is not None else chain_head(conn)
    row_id = prev_id + 1
    detail_json = canonical_detail(detail)
    digest = row_hash(key, prev_hash, row_id, ts, event, user, device_id, service, source, reason, detail_json)
    conn.execute(
        "INSERT INTO audit (id, ts, event, user, device_id, service, source, reason, detail, prev_hash, hash)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (row_id, ts, event, user, device_id, service, source, reason, detail_json, prev_hash, digest),
    )
    return row_id, digest


def chain_head(conn: sqlite3.Connection) -> tuple[int, str]:
    """The id the last row had (or that AUTOINCREMENT last handed out) and the last row's hash."""
    last = conn.execute("SELECT id, hash FROM audit ORDER BY id DESC LIMIT 1").fetchone()
    seq = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'audit'").fetchone()
    return max(last[0] if last else 0, seq[0] if seq else 0), (last[1] if last else GENESIS_HASH)


_COLUMNS = "id, ts, event, user, device_id, service, source, reason, detail, prev_hash, hash"


def _to_row(r: tuple[Any, ...]) -> AuditRow:
    try:
        detail = json.loads(r[8]) if r[8] else {}
    except (TypeError, ValueError):
        detail = {"unreadable": True}
    return AuditRow(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], detail, r[9], r[10])


def rows(
    conn: sqlite3.Connection,
    *,
    user: str | None = None,
    since: float | None = None,
    after_id: int | None = None,
    limit: int | None = None,
) -> Iterator[AuditRow]:
    where = []
    args: list[Any] = []
    if user is not None:
        where.append("user = ?")
        args.append(user)
    if since is not None:
        where.append("ts >= ?")
        args.append(since)
    if after_id is not None:
        where.append("id > ?")
        args.append(after_id)
    sql = f"SELECT {_COLUMNS} FROM audit"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY id"
    if limit is not None:
        sql = f"SELECT * FROM ({sql.replace(' ORDER BY id', ' ORDER BY id DESC')} LIMIT ?) ORDER BY id"
        args.append(limit)
    for r in conn.execute(sql, args):
        yield _to_row(r)


@dataclass(frozen=True)
class ChainProblem:
    row_id: int
    problem: str


@dataclass(frozen=True)
class ChainReport:
    rows_checked: int
    head_id: int
    head_hash: str
    problems: tuple[ChainProblem, ...]

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_chain(raw_rows: Iterable[tuple[Any, ...]], key: bytes, sequence: int | None) -> ChainReport:
    """Check every link. ``raw_rows`` are (id, ts, event, ..., prev_hash, hash) in id order."""
    problems: list[ChainProblem] = []
    expected_prev = GENESIS_HASH
    expected_id = 1
    count = 0
    head_id, head_hash = 0, GENESIS_HASH
    for r in raw_rows:
        count += 1
        row_id, ts, event, user, device_id, service, source, reason, detail, prev_hash, stored = r
        if row_id != expected_id:
            if row_id > expected_id:
                gap = f"{expected_id}" if row_id == expected_id + 1 else f"{expected_id}-{row_id - 1}"
                problems.append(ChainProblem(row_id, f"row(s) {gap} are missing (deleted)"))
            else:
                problems.append(ChainProblem(row_id, "row id is out of order"))
        if prev_hash != expected_prev:
            problems.append(
                ChainProblem(
                    row_id, "link to the previous row is broken (a row before it was deleted, reordered or edited)"
                )
            )
        try:
            computed = row_hash(
                key, prev_hash, row_id, ts, event, user, device_id, service, source, reason, detail or "{}"
            )
            intact = isinstance(stored, str) and hmac.compare_digest(computed, stored)
        except (TypeError, ValueError, OverflowError, AttributeError):
            intact = False  # a value of the wrong type: only an edit outside mfaguard puts one there
        if not intact:
            problems.append(ChainProblem(row_id, "contents do not match the row's hash (the row was edited)"))
        expected_prev = stored
        expected_id = row_id + 1
        head_id, head_hash = row_id, stored
    if sequence is not None and sequence > head_id:
        problems.append(
            ChainProblem(sequence, f"the newest row(s) {head_id + 1}-{sequence} are missing (the log was truncated)")
        )
    return ChainReport(count, head_id, head_hash, tuple(problems))


TRIGGERS = ("audit_append_only_update", "audit_append_only_delete")


def verify(conn: sqlite3.Connection, key: bytes) -> ChainReport:
    seq = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'audit'").fetchone()
    cursor = conn.execute(f"SELECT {_COLUMNS} FROM audit ORDER BY id")
    report = verify_chain(cursor, key, seq[0] if seq else None)
    problems = list(report.problems)
    first = conn.execute("SELECT id, event FROM audit ORDER BY id LIMIT 1").fetchone()
    if first is None:
        # `mfa-admin init` writes the first row, so an initialised database never has an empty log.
        problems.append(ChainProblem(0, "the log is empty: its rows were deleted, or the database was replaced"))
    elif first[1] not in ("init", "migrate") and not any(p.row_id == first[0] for p in problems):
        problems.append(ChainProblem(first[0], "the oldest row is not the init row: earlier rows were deleted"))
    present = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'")}
    for name in TRIGGERS:
        if name not in present:
            problems.append(ChainProblem(0, f"the append-only trigger {name} is missing: somebody dropped it"))
    return ChainReport(report.rows_checked, report.head_id, report.head_hash, tuple(problems))
