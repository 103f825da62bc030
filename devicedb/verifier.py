"""The one decision path every front end calls.

Order, inside one ``BEGIN IMMEDIATE`` transaction:
lockout first, then the user's devices, then the code, then the replay-state
advance whose row count decides, then the failure counter, then the audit row.
Any exception becomes ``Result.ERROR``: nothing here ever fails open.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from devicedb import backup_codes
from devicedb.errors import InvalidUserName, MfaguardError, SealError
from devicedb.kinds import Match, get_kind

if TYPE_CHECKING:
    from devicedb.kinds import fido2_key, ssh_sk
from devicedb.models import (
    FIDO_REQUIRED,
    ONLY_SECURITY_KEYS,
    Advance,
    Context,
    Decision,
    Device,
    Requirement,
    RequirementDecision,
    Result,
)
from devicedb.policy import grace_applies, is_exempt
from devicedb.settings import Settings
from devicedb.store import Store, Tx
from devicedb.usernames import audit_name, canonical_user, safe_display

log = logging.getLogger("mfaguard")

# Longer responses cannot be any code; they are refused before any work.
MAX_RESPONSE_CHARS = 64

Clock = Callable[[], float]

# How long the auth phase's success stays redeemable by the account phase.
TICKET_LIFETIME = 300.0


def describe_error(exc: BaseException) -> str:
    """Our own errors carry vetted messages; anything else is named by type only, so that no
    code or secret can reach an audit row through an exception's text."""
    if isinstance(exc, MfaguardError):
        return f"error: {exc}"
    return f"error: {type(exc).__name__}"


def _backup_shaped(response: object) -> bool:
    """Whether a response could be a backup code of either length (and so needs its user's set)."""
    if isinstance(response, bytes):
        response = response.decode("utf-8", errors="replace")
    if not isinstance(response, str) or len(response) > MAX_RESPONSE_CHARS:
        return False
    return bool(backup_codes.normalise(response) or backup_codes.normalise(response, backup_codes.LEGACY_DIGITS))


class Verifier:
    def __init__(
        self,
        settings: Settings,
        *,
        store: Store | None = None,
        clock: Clock = time.time,
    ) -> None:
        self.settings = settings
        self.clock = clock
        self._store = store

    def store(self) -> Store:
        if self._store is None:
            self._store = Store.open(self.settings, clock=self.clock)
        return self._store

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None

    # -- policy -------------------------------------------------------------------
    def requirement(self, raw_user: str | bytes, context: Context) -> RequirementDecision:
        """Whether this user must present a second factor. Errors mean REQUIRED."""
        try:
            user = canonical_user(raw_user, self.settings.usernames)
        except InvalidUserName as exc:
            return RequirementDecision(Requirement.REQUIRED, f"refused user name: {exc}", safe_display(raw_user))
        try:
            rules = self.settings.enforcement
            exempt = is_exempt(user, rules, self.settings.usernames)
            grace = None if exempt else grace_applies(user, rules, self.settings.usernames, self.clock())
            if not exempt and not grace:
                # Settings alone decide: no transaction, no audit row (the verification that follows writes one).
                return RequirementDecision(Requirement.REQUIRED, "second factor required", user)
            with self.store().transaction() as tx:
                if exempt:
                    tx.audit("auth", user, context, reason=f"exempt: {exempt}")
                    return RequirementDecision(Requirement.EXEMPT, exempt, user)
                grace = grace_applies(user, rules, self.settings.usernames, tx.now)
                # A pending enrollment (not yet confirmed) does not end the grace; any other device does.
                if grace and not [d for d in tx.devices(user) if not d.pending]:
                    tx.audit("auth", user, context, reason=f"grace: {grace}")
                    return RequirementDecision(Requirement.GRACE, grace, user)
        except Exception as exc:
            log.exception("requirement check failed for %s", user)
            return RequirementDecision(Requirement.REQUIRED, describe_error(exc), user)
        return RequirementDecision(Requirement.REQUIRED, "second factor required", user)

    # -- verification --------------------------------------------------------------
    def verify(self, raw_user: str | bytes, response: str | bytes, context: Context) -> Decision:
        """Check what the user typed. Returns exactly one Decision; never raises."""
        try:
            user = canonical_user(raw_user, self.settings.usernames)
        except InvalidUserName as exc:
            return self._error(None, context, f"refused user name: {exc}", {"name": safe_display(raw_user)})
        except Exception as exc:
            log.exception("user name check failed")
            return self._error(None, context, describe_error(exc))
        try:
            return self._verify(user, response, context)
        except Exception as exc:  # MemoryError included: fail closed, then say why
            log.exception("verification failed for %s", user)
            return self._error(user, context, describe_error(exc))

    def _prepare(
        self, user: str, response: str | bytes, backup_sets: dict[str, tuple[bytes, int]] | None = None
    ) -> tuple[str | None, tuple[bytes, bytes] | None]:
        """The typed text (None if it cannot be a code) and, for a backup-code shape, its digest.

        scrypt runs here, before the write lock is taken; the salt is re-checked inside.
        ``backup_sets`` is the users' sets read beforehand for a whole batch.
        """
        text: str | None
        if isinstance(response, bytes):
            try:
                text = response.decode("utf-8", errors="strict")
            except UnicodeDecodeError:
                text = None
        else:
            text = response if isinstance(response, str) else None
        if text is not None and len(text) > MAX_RESPONSE_CHARS:
            text = None
        prehashed: tuple[bytes, bytes] | None = None
        if not text:
            backup_set = None
        elif backup_sets is not None:
            backup_set = backup_sets.get(user)
        else:
            backup_set = self.store().backup_set(user)
        if text and backup_set is not None:
            salt, digits = backup_set
            backup_digits = backup_codes.normalise(text, digits)
            if backup_digits is not None:
                prehashed = (salt, backup_codes.digest(backup_digits, salt))
        return text, prehashed

    def _verify(self, user: str, response: str | bytes, context: Context) -> Decision:
        text, prehashed = self._prepare(user, response)
        with self.store().transaction() as tx:
            return self._decide(tx, user, text, prehashed, context)

    def verify_batch(self, attempts: list[tuple[str | bytes, str | bytes, Context]]) -> list[Decision]:
        """Several verifications under one write transaction and one commit (group commit).

        Each attempt runs the same decision path inside its own savepoint, in order, so a
        later attempt sees an earlier one's replay state and failures. No decision may be
        acted on before this returns: if the shared commit fails, every decision is ERROR.
        """
        prepared: list[tuple[str | None, str | None, tuple[bytes, bytes] | None, Context, Decision | None]] = []
        users: list[str | None] = []
        for raw_user, _, _ in attempts:
            try:
                users.append(canonical_user(raw_user, self.settings.usernames))
            except Exception:
                users.append(None)  # refused again below, with its reason
        # Only a response shaped like a backup code (of either length) needs its user's set.
        shaped = [u for u, (_, response, _) in zip(users, attempts, strict=True) if u and _backup_shaped(response)]
        try:
            backup_sets: dict[str, tuple[bytes, int]] | None = self.store().backup_sets(shaped) if shaped else {}
        except Exception:
            backup_sets = None  # each attempt reads its own below, and fails on its own if it must
        for (raw_user, response, context), known in zip(attempts, users, strict=True):
            try:
                user = known if known is not None else canonical_user(raw_user, self.settings.usernames)
                text, prehashed = self._prepare(user, response, backup_sets)
                prepared.append((user, text, prehashed, context, None))
            except InvalidUserName as exc:
                refused = Decision(Result.ERROR, f"refused user name: {exc}", None)
                prepared.append((None, None, None, context, refused))
            except Exception as exc:
                log.exception("verification failed")
                prepared.append((None, None, None, context, Decision(Result.ERROR, describe_error(exc), None)))
        decisions: list[Decision] = []
        try:
            with self.store().transaction() as tx:
                tx.prefetch([item[0] for item in prepared if item[0] is not None])
                for batch_user, text, prehashed, context, early in prepared:
                    if early is not None or batch_user is None:
                        decision = early or Decision(Result.ERROR, "error", None)
                        with tx.savepoint():
                            tx.audit("auth", decision.user, context, reason=decision.reason)
                        decisions.append(decision)
                        continue
                    try:
                        with tx.savepoint():
                            decisions.append(self._decide(tx, batch_user, text, prehashed, context))
                    except Exception as exc:
                        log.exception("verification failed for %s", batch_user)
                        decision = Decision(Result.ERROR, describe_error(exc), batch_user)
                        try:
                            with tx.savepoint():
                                tx.audit("auth", batch_user, context, reason=decision.reason)
                        except Exception:
                            log.exception("could not audit an error decision")
                        decisions.append(decision)
        except Exception as exc:
            log.exception("group commit failed")
            reason = describe_error(exc)
            return [Decision(Result.ERROR, reason, item[0]) for item in prepared]
        return decisions

    def code_lengths(self, raw_user: str | bytes) -> set[int]:
        """The lengths of code this user's usable devices and backup codes accept (RADIUS append mode)."""
        user = canonical_user(raw_user, self.settings.usernames)
        lengths: set[int] = set()
        with self.store().transaction() as tx:
            for device in tx.devices(user):
                kind = get_kind(device.kind)
                if device.usable and kind is not None:
                    lengths |= kind.code_lengths(device)
            if tx.has_backup_codes(user):
                if tx.backup_code_digits(user) == backup_codes.LEGACY_DIGITS:
                    lengths.add(backup_codes.LEGACY_DIGITS)
                else:
                    lengths |= {backup_codes.CODE_DIGITS, backup_codes.CODE_DIGITS + 1}
        return lengths

    def _decide(
        self, tx: Tx, user: str, text: str | None, prehashed: tuple[bytes, bytes] | None, context: Context
    ) -> Decision:
        lock = tx.lock_state(user)
        devices = tx.devices(user)
        usable = [d for d in devices if d.usable and get_kind(d.kind) is not None]
        if lock.locked_at(tx.now):
            reason = "locked (hard lock: an administrator must unlock)" if lock.hard_locked else "locked"
            # The same work as an unlocked attempt, its result thrown away, so that the time an
            # answer takes does not tell a locked account from a wrong code.
            if text is not None:
                self._match_all(usable, tx, text)
            # Nothing is counted or reset while locked, a right code included.
            tx.audit("auth", user, context, reason=reason)
            return Decision(Result.LOCKED, reason, user)
        if not devices:
            tx.audit("auth", audit_name(user, known=False), context, reason="no device enrolled")
            return Decision(Result.NO_DEVICE, "no device enrolled", user)
        if self.fido_required(context):
            # Neither a code nor a backup code counts here; nothing was guessed, so nothing is counted.
            tx.audit("auth", user, context, reason=f"code refused: {FIDO_REQUIRED}")
            return Decision(Result.NO_USABLE_DEVICE, FIDO_REQUIRED, user)
        # Backup codes stand in for a lost device that the administrator disabled; they are
        # no enrollment of their own, so a user with no device at all is refused above.
        if not usable and not tx.has_backup_codes(user):
            reason = "no usable device (all disabled, pending or of an unknown kind)"
            tx.audit("auth", user, context, reason=reason)
            return Decision(Result.NO_USABLE_DEVICE, reason, user)
        takes_codes = [d for d in usable if (k := get_kind(d.kind)) is not None and k.code_lengths(d)]
        if not takes_codes and not tx.has_backup_codes(user):
            tx.audit("auth", user, context, reason=ONLY_SECURITY_KEYS)
            return Decision(Result.NO_USABLE_DEVICE, ONLY_SECURITY_KEYS, user)

        if text is None:
            return self._fail(tx, user, context, Result.BAD_CODE, "malformed response")

        backup = tx.use_backup_code(user, *prehashed) if prehashed is not None else None
        if backup == "replay":
            return self._fail(tx, user, context, Result.REPLAY, "replay: backup code already used")
        if backup == "used":
            left = tx.backup_codes_left(user)
            tx.record_success(user)
            tx.audit("backup_code_used", user, context, reason="backup code used", detail={"remaining": left})
            tx.audit("auth", user, context, reason="accepted: backup code", detail={"remaining": left})
            return Decision(Result.ACCEPTED, "backup code", user)

        matches, unreadable = self._match_all(usable, tx, text)

        replayed = False
        for device, found in matches:
            if found.replay:
                replayed = True
                continue
            if found.advance is None:
                if found.note:
                    tx.note_state(device, found.note)
                continue
            if tx.advance(device, found.advance):
                tx.record_success(user)
                detail = {"kind": device.kind, "offset": found.offset}
                tx.audit("auth", user, context, reason="accepted", device_id=device.id, detail=detail)
                return Decision(Result.ACCEPTED, "accepted", user, device.id)
            replayed = True  # another process advanced the state first
        if replayed:
            device_id = next((d.id for d, m in matches if m.replay or m.advance is not None), None)
            return self._fail(tx, user, context, Result.REPLAY, "replay: code already used", device_id)
        if unreadable:
            reason = f"error: sealed secret of device(s) {unreadable} does not open"
            return self._fail(tx, user, context, Result.ERROR, reason)
        return self._fail(tx, user, context, Result.BAD_CODE, "bad code")

    def _match_all(self, usable: list[Device], tx: Tx, text: str) -> tuple[list[tuple[Device, Match]], list[int]]:
        """Every usable device's verdict on the text. Reads only: no state moves here."""
        matches: list[tuple[Device, Match]] = []
        unreadable: list[int] = []
        for device in usable:
            kind = get_kind(device.kind)
            if kind is None or len(text) not in kind.code_lengths(device):
                continue
            try:
                secret = tx.open_secret(device)
            except SealError as exc:
                log.error("%s", exc)
                unreadable.append(device.id)
                continue
            found = kind.match(device, secret, text, tx.now, self.settings.totp.window)
            if found is not None:
                matches.append((device, found))
        return matches, unreadable

    def _fail(
        self, tx: Tx, user: str, context: Context, result: Result, reason: str, device_id: int | None = None
    ) -> Decision:
        """Every failed attempt on a user with usable devices counts against one shared counter."""
        locked = tx.record_failure(user, self.settings.lockout)
        tx.audit("auth", user, context, reason=reason, device_id=device_id)
        if locked:
            state = tx.lock_state(user)
            detail = {"consecutive_failures": state.consecutive_failures}
            if locked == "lock" and state.locked_until is not None:
                detail["locked_for_seconds"] = self.settings.lockout.lock_seconds
            tx.audit("lock", user, context, reason=locked.replace("_", " "), detail=detail)
        return Decision(result, reason, user, device_id)

    def _error(self, user: str | None, context: Context, reason: str, detail: dict[str, str] | None = None) -> Decision:
        """Record an error decision where the database allows it; the decision stands either way."""
        try:
            with self.store().transaction() as tx:
                tx.audit("auth", user, context, reason=reason, detail=detail)
        except Exception as exc:
            log.error("could not write the audit row for an error decision (%s): %s", reason, exc)
        return Decision(Result.ERROR, reason, user)

    def ssh_key_factor(
        self,
        raw_user: str | bytes,
        auth_info: str,
        context: Context,
        *,
        user_files: Callable[[], ssh_sk.UserKeyFiles] | None = None,
    ) -> Decision | None:
        """The FIDO factor of an SSH login: sshd's SSH_AUTH_INFO_0 names a publickey login with one of
        the user's enabled security keys. Returns None when it names none (the caller asks for a code),
        else the decision, audited: ACCEPTED, LOCKED for a locked user, or NO_USABLE_DEVICE when the
        key does not count because ``user_files`` (the user's own authorized_keys, read by the front
        end when called) hold it with weaker options or cannot be checked, or were not given."""
        try:
            from devicedb.kinds import ssh_sk

            if not ssh_sk.used_keys(auth_info):
                return None
            found = user_files() if user_files is not None else None
            user = canonical_user(raw_user, self.settings.usernames)
            with self.store().transaction() as tx:
                keys = [d for d in tx.devices(user) if d.kind == ssh_sk.KIND and d.usable]
                device = next((d for d in keys if ssh_sk.matches_login(d, auth_info)), None)
                if device is None:
                    return None
                if tx.lock_state(user).locked_at(tx.now):
                    tx.audit("auth", user, context, reason="locked", device_id=device.id)
                    return Decision(Result.LOCKED, "locked", user, device.id)
                weakened = ssh_sk.user_files_weaken(device, found)
                if weakened is not None:
                    reason = f"ssh security key not counted: {weakened}"
                    tx.audit("auth", user, context, reason=reason, device_id=device.id, detail={"kind": ssh_sk.KIND})
                    return Decision(Result.NO_USABLE_DEVICE, reason, user, device.id)
                tx.touch_device(device)
                tx.record_success(user)
                tx.audit(
                    "auth",
                    user,
                    context,
                    reason="accepted: ssh security key",
                    device_id=device.id,
                    detail={"kind": ssh_sk.KIND},
                )
                return Decision(Result.ACCEPTED, "ssh security key", user, device.id)
        except Exception as exc:
            log.exception("security-key check failed")
            return self._error(None, context, describe_error(exc))

    def fido_required(self, context: Context) -> bool:
        """Whether this service accepts only a FIDO2 key (settings fido.required_for_services)."""
        return context.service in self.settings.fido.required_for_services

    def has_fido_key(self, raw_user: str | bytes) -> bool:
        """Whether the user has an enabled local FIDO2 key (cheap: no fido2 import)."""
        try:
            user = canonical_user(raw_user, self.settings.usernames)
            return any(d.kind == "fido2" and d.usable for d in self.store().list_devices(user))
        except Exception:
            return False

    def fido_request(self, raw_user: str | bytes) -> tuple[str, bytes, list[bytes], bool] | None:
        """What to ask a local FIDO2 key for: (RP id, fresh challenge, allowed credential ids, UV needed),
        or None when the user has no enabled FIDO2 key."""
        import secrets as random

        from devicedb.kinds import fido2_key

        user = canonical_user(raw_user, self.settings.usernames)
        keys = [d for d in self.store().list_devices(user) if d.kind == fido2_key.KIND and d.usable]
        if not keys:
            return None
        rp_id = str(keys[0].params.get("rp_id"))
        same_rp = [d for d in keys if d.params.get("rp_id") == rp_id]
        needs_uv = any(d.params.get("uv") == "required" for d in same_rp)
        return rp_id, random.token_bytes(32), [fido2_key.credential_id(d) for d in same_rp], needs_uv

    def verify_fido(
        self, raw_user: str | bytes, assertion: fido2_key.Assertion, rp_id: str, challenge: bytes, context: Context
    ) -> Decision:
        """Check one assertion from a local key against the user's enrolled FIDO2 credentials: the same
        one decision path (lockout first, the sign counter advanced by a conditional UPDATE, audit)."""
        try:
            from devicedb.kinds import fido2_key

            user = canonical_user(raw_user, self.settings.usernames)
            with self.store().transaction() as tx:
                if tx.lock_state(user).locked_at(tx.now):
                    tx.audit("auth", user, context, reason="locked")
                    return Decision(Result.LOCKED, "locked", user)
                device = next(
                    (
                        d
                        for d in tx.devices(user)
                        if d.kind == fido2_key.KIND
                        and d.usable
                        and hmac.compare_digest(fido2_key.credential_id(d), assertion.credential_id)
                    ),
                    None,
                )
                if device is None:
                    return self._fail(tx, user, context, Result.BAD_CODE, "fido2: not a credential of this user")
                check = fido2_key.check_assertion(
                    device, assertion, rp_id, challenge, require_uv=device.params.get("uv") == "required"
                )
                if check.possible_clone:
                    tx.audit(
                        "auth",
                        user,
                        context,
                        reason="fido2: possible clone",
                        device_id=device.id,
                        detail={"stored": device.sign_count, "presented": check.sign_count},
                    )
                if not check.ok:
                    return self._fail(tx, user, context, Result.BAD_CODE, f"fido2: {check.reason}", device.id)
                if check.sign_count == 0:
                    tx.touch_device(device)  # a key that keeps no counter: nothing to advance
                elif not tx.advance(device, Advance("sign_count", check.sign_count)):
                    return self._fail(tx, user, context, Result.REPLAY, "replay: sign count already used", device.id)
                tx.record_success(user)
                tx.audit(
                    "auth",
                    user,
                    context,
                    reason="accepted: fido2 key",
                    device_id=device.id,
                    detail={"kind": fido2_key.KIND, "sign_count": check.sign_count},
                )
                return Decision(Result.ACCEPTED, "fido2 key", user, device.id)
        except Exception as exc:
            log.exception("fido2 verification failed")
            return self._error(None, context, describe_error(exc))

    def record_fido_failure(self, raw_user: str | bytes, context: Context, reason: str) -> Decision:
        """A FIDO2 attempt that failed before any assertion reached the core, such as a wrong PIN: a
        failed attempt like a wrong code, on the same path (lockout first, the shared failure counter,
        the audit row). ``reason`` must hold no PIN."""
        try:
            user = canonical_user(raw_user, self.settings.usernames)
            with self.store().transaction() as tx:
                if tx.lock_state(user).locked_at(tx.now):
                    tx.audit("auth", user, context, reason="locked")
                    return Decision(Result.LOCKED, "locked", user)
                return self._fail(tx, user, context, Result.BAD_CODE, f"fido2: {reason}")
        except Exception as exc:
            log.exception("recording a failed fido2 attempt failed")
            return self._error(None, context, describe_error(exc))

    def record_abandoned(self, raw_user: str | bytes, context: Context, reason: str) -> Decision:
        """An attempt that never reached a code (empty answer, conversation error, missing phase).

        It is denied and audited; it does not count on the lockout counter, since nothing was guessed.
        """
        try:
            user: str | None = canonical_user(raw_user, self.settings.usernames)
        except InvalidUserName:
            user = None
        return self._error(user, context, reason)

    # -- auth tickets: carrying "the second factor passed" from the auth to the account phase --
    def issue_ticket(self, user: str, context: Context, lifetime: float = TICKET_LIFETIME) -> str:
        """For a user the verifier has just accepted (or exempted). The token is a secret: it is
        never logged, and a front end removes it from wherever it carried it once redeemed."""
        with self.store().transaction() as tx:
            return tx.issue_ticket(canonical_user(user, self.settings.usernames), context.service, lifetime)

    def redeem_ticket(self, raw_user: str | bytes, token: str, context: Context) -> bool:
        """True once for a ticket issued to this user and service within its lifetime. Never raises."""
        try:
            user = canonical_user(raw_user, self.settings.usernames)
            with self.store().transaction() as tx:
                return tx.redeem_ticket(user, context.service, token)
        except Exception:
            log.exception("auth ticket check failed")
            return False

    # -- enrollment confirmation ------------------------------------------------------
    def confirm_enrollment(self, raw_user: str, device_id: int, code: str, context: Context) -> Decision:
        """Activate a pending device once a code from it verifies. Does not touch the lockout counter."""
        try:
            user = canonical_user(raw_user, self.settings.usernames)
            with self.store().transaction() as tx:
                device = tx.device(user, device_id)
                if not device.pending:
                    return Decision(Result.ERROR, "device is not pending confirmation", user, device_id)
                kind = get_kind(device.kind)
                found = None
                if kind is not None:
                    found = kind.match(device, tx.open_secret(device), code, tx.now, self.settings.totp.window)
                if found is None or found.advance is None or found.replay:
                    tx.audit("auth", user, context, reason="enrollment code did not verify", device_id=device_id)
                    return Decision(Result.BAD_CODE, "enrollment code did not verify", user, device_id)
                if not tx.confirm_device(device, found.advance):
                    return Decision(Result.REPLAY, "device was confirmed elsewhere", user, device_id)
                tx.audit("device_confirmed", user, context, reason="confirmed with a code", device_id=device_id)
                return Decision(Result.ACCEPTED, "confirmed", user, device_id)
        except Exception as exc:
            log.exception("enrollment confirmation failed")
            return Decision(Result.ERROR, describe_error(exc), None, device_id)
