"""Plain data passed between the core and its front ends."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from typing import Any


class Result(enum.Enum):
    ACCEPTED = "accepted"
    BAD_CODE = "bad_code"
    REPLAY = "replay"
    LOCKED = "locked"
    NO_DEVICE = "no_device"
    NO_USABLE_DEVICE = "no_usable_device"
    ERROR = "error"


class Requirement(enum.Enum):
    """Whether a user must present a second factor. Only REQUIRED leads to a prompt."""

    REQUIRED = "required"
    EXEMPT = "exempt"
    GRACE = "grace"


# The one message a front end shows for every failure, so that a locked account,
# a replay and a bad code look the same from outside.
PUBLIC_FAILURE_MESSAGE = "Verification failed."

# The reason of a decision for a user whose only devices are security keys, which no code reaches
# (RADIUS names it to the user: such a VPN login can never work).
ONLY_SECURITY_KEYS = "only security keys are enrolled: no device takes a code"
FIDO_REQUIRED = "this service accepts only a FIDO2 key"


@dataclass(frozen=True)
class Context:
    """Where an attempt comes from. Every field is optional text, shown in the audit log."""

    service: str = "unknown"
    remote_host: str | None = None
    client: str | None = None
    nas: str | None = None
    tty: str | None = None
    ruser: str | None = None

    @property
    def source(self) -> str | None:
        return self.remote_host or self.client

    def detail(self) -> dict[str, str]:
        extra = {"nas": self.nas, "tty": self.tty, "ruser": self.ruser, "client": self.client}
        return {k: v for k, v in extra.items() if v}


@dataclass(frozen=True)
class Decision:
    result: Result
    reason: str
    user: str | None = None
    device_id: int | None = None

    @property
    def accepted(self) -> bool:
        return self.result is Result.ACCEPTED

    @property
    def public_message(self) -> str:
        return "Verified." if self.accepted else PUBLIC_FAILURE_MESSAGE


@dataclass(frozen=True)
class RequirementDecision:
    requirement: Requirement
    reason: str
    user: str


@dataclass
class Device:
    id: int
    user: str
    kind: str
    label: str
    algorithm: str | None
    digits: int | None
    period: int | None
    sealed_secret: bytes | None
    last_step: int | None
    next_counter: int | None
    sign_count: int | None
    drift: int
    params: dict[str, Any]
    enabled: bool
    pending: bool
    created_at: float
    last_used_at: float | None
    resync_counter: int | None = None
    resync_at: float | None = None

    @property
    def usable(self) -> bool:
        return self.enabled and not self.pending

    @property
    def status(self) -> str:
        if self.pending:
            return "pending"
        return "active" if self.enabled else "disabled"

    def public_dict(self) -> dict[str, Any]:
        """Everything about the device except its secret."""
        return {
            "id": self.id,
            "user": self.user,
            "kind": self.kind,
            "label": self.label,
            "algorithm": self.algorithm,
            "digits": self.digits,
            "period": self.period,
            "status": self.status,
            "enabled": self.enabled,
            "pending": self.pending,
            "last_step": self.last_step,
            "next_counter": self.next_counter,
            "sign_count": self.sign_count,
            "drift": self.drift,
            "weak": bool(self.params.get("weak", False)),
            "created_at": self.created_at,
            "last_used_at": self.last_used_at,
        }


@dataclass(frozen=True)
class LockState:
    failures: int = 0
    consecutive_failures: int = 0
    locked_until: float | None = None
    hard_locked: bool = False
    last_failure_at: float | None = None
    last_success_at: float | None = None

    def locked_at(self, now: float) -> bool:
        return self.hard_locked or (self.locked_until is not None and now < self.locked_until)


@dataclass(frozen=True)
class Advance:
    """How a successful match moves a device's replay state.

    The store applies it as ``UPDATE ... SET field = new_value WHERE field IS NULL OR
    field < new_value``: the row count decides, so two racing processes get one success.
    """

    field: str
    new_value: int
    extra: dict[str, int | float | None] = dataclass_field(default_factory=dict)


@dataclass(frozen=True)
class AuditRow:
    id: int
    ts: float
    event: str
    user: str | None
    device_id: int | None
    service: str | None
    source: str | None
    reason: str | None
    detail: dict[str, Any]
    prev_hash: str
    hash: str

    def as_dict(self) -> dict[str, Any]:
        import datetime as dt

        return {
            "id": self.id,
            "time": dt.datetime.fromtimestamp(self.ts, dt.UTC).isoformat(timespec="microseconds"),
            "ts": self.ts,
            "event": self.event,
            "user": self.user,
            "device_id": self.device_id,
            "service": self.service,
            "source": self.source,
            "reason": self.reason,
            "detail": self.detail,
            "prev_hash": self.prev_hash,
            "hash": self.hash,
        }
