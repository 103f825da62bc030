"""Group verification (verify_batch), auth tickets, abandoned attempts and refused-name redaction."""

from __future__ import annotations

import sqlite3
from typing import TYPE_CHECKING

from devicedb.kinds import totp
from devicedb.models import Context, Result
from devicedb.store import Store
from devicedb.verifier import Verifier

if TYPE_CHECKING:
    from conftest import Clock, Enroll, MfaEnv

SEED_A = bytes(range(20))
SEED_B = bytes(range(20, 40))
CTX = Context(service="radius", client="nas1")


def code(secret: bytes, now: float) -> str:
    return totp.code_at(secret, 6, "sha1", 30, now)


def test_batch_gives_one_decision_per_attempt_in_order(
    store: Store, verifier: Verifier, enroll: Enroll, clock: Clock
) -> None:
    enroll(store, "alice", SEED_A)
    enroll(store, "bob", SEED_B)
    right_a = code(SEED_A, clock())
    decisions = verifier.verify_batch(
        [
            ("alice", right_a, CTX),
            ("bob", "000000" if code(SEED_B, clock()) != "000000" else "111111", CTX),
            ("alice", right_a, CTX),  # the same code again in the same batch: a replay
            ("nobody", "123456", CTX),
        ]
    )
    assert [d.result for d in decisions] == [Result.ACCEPTED, Result.BAD_CODE, Result.REPLAY, Result.NO_DEVICE]
    rows = [r for r in store.audit_rows() if r.event == "auth"]
    assert [r.reason for r in rows][-4:] == ["accepted", "bad code", "replay: code already used", "no device enrolled"]
    assert store.verify_audit().ok


def test_batch_refused_name_and_broken_attempt_are_audited_and_isolated(
    mfa_env: MfaEnv, store: Store, verifier: Verifier, enroll: Enroll, clock: Clock
) -> None:
    enroll(store, "alice", SEED_A)
    enroll(store, "carol", SEED_B)
    # Corrupt carol's lockout row so that her attempt raises inside the decision path.
    with mfa_env.raw() as raw:
        raw.execute("INSERT INTO lockout (user, failures) VALUES ('carol', 'not a number')")
    decisions = verifier.verify_batch(
        [
            ("carol", "000000", CTX),
            ("bad\x00name", "123456", CTX),
            ("alice", code(SEED_A, clock()), CTX),
        ]
    )
    assert [d.result for d in decisions] == [Result.ERROR, Result.ERROR, Result.ACCEPTED]
    reasons = [(r.user, r.reason) for r in store.audit_rows() if r.event == "auth"][-3:]
    assert reasons[0][0] == "carol" and reasons[0][1].startswith("error")
    assert reasons[1][0] is None and reasons[1][1].startswith("refused user name")
    assert reasons[2] == ("alice", "accepted")


def test_refused_names_never_carry_a_code_into_the_audit_log(store: Store, verifier: Verifier) -> None:
    # A user who types the code at the user-name prompt, with a stray control character.
    decision = verifier.verify("428193\x01", "428193", Context(service="sshd"))
    assert decision.result is Result.ERROR
    row = store.audit_rows()[-1]
    assert "428193" not in repr(row.as_dict())
    assert row.detail["name"].startswith("#######") and "masked" in row.detail["name"]
    # An ordinary name with digits in it is shown as it is.
    verifier.verify("u12345678\x01", "123456", Context(service="sshd"))
    assert store.audit_rows()[-1].detail["name"] == "u12345678\\x01"


def test_abandoned_attempt_is_audited_and_not_counted(store: Store, verifier: Verifier, enroll: Enroll) -> None:
    enroll(store, "alice", SEED_A)
    decision = verifier.record_abandoned("alice", Context(service="sudo"), "empty answer")
    assert not decision.accepted
    assert store.audit_rows()[-1].reason == "empty answer"
    assert store.lock_state("alice").failures == 0


def test_auth_ticket_is_one_time_and_bound_to_user_and_service(store: Store, verifier: Verifier, clock: Clock) -> None:
    sshd = Context(service="sshd")
    token = verifier.issue_ticket("alice", sshd)
    assert not verifier.redeem_ticket("bob", token, sshd)
    assert not verifier.redeem_ticket("alice", token, Context(service="sudo"))
    assert verifier.redeem_ticket("alice", token, sshd)
    assert not verifier.redeem_ticket("alice", token, sshd)  # used once
    late = verifier.issue_ticket("alice", sshd, lifetime=10)
    clock.advance(11)
    assert not verifier.redeem_ticket("alice", late, sshd)  # expired
    # Only a digest is stored, never the token.
    with sqlite3.connect(store.settings.database.path) as raw:
        stored = [r[0] for r in raw.execute("SELECT digest FROM auth_tickets")]
    assert token not in stored and late not in stored


def test_code_lengths_follow_the_usable_devices(store: Store, verifier: Verifier, enroll: Enroll) -> None:
    assert verifier.code_lengths("alice") == set()
    enroll(store, "alice", SEED_A, digits=8)
    assert verifier.code_lengths("alice") == {8}
