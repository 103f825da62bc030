"""Lockout: checked before the code, one counter per user across every front end."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from devicedb.manage import DeviceManager
from devicedb.models import PUBLIC_FAILURE_MESSAGE, Context, LockState, Result
from devicedb.store import Store
from devicedb.verifier import Verifier

if TYPE_CHECKING:
    from conftest import Enroll, Lib, MfaEnv

CTX = Context(service="test")
SECRET = b"lockout-test-secret-20b"[:20]
BOB_SECRET = b"lockout-test-bob-secret"[:20]
LOCKOUT = "lockout:\n  max_failures: 3\n  lock_seconds: 300\n  hard_lock_after: 10\n"


class Env:
    def __init__(self, mfa_env: MfaEnv, store: Store, verifier: Verifier, lib: type[Lib]) -> None:
        self.lib = lib
        self.mfa_env = mfa_env
        self.clock = mfa_env.clock
        self.store = store
        self.verifier = verifier
        self.manager = DeviceManager(store)

    def right(self) -> str:
        return self.lib.code(SECRET, self.clock())

    def wrong(self) -> str:
        return self.lib.wrong_code(SECRET, self.clock())

    def state(self, user: str = "alice") -> LockState:
        return self.store.lock_state(user)

    def fail(self, times: int, context: Context = CTX) -> list[Result]:
        return [self.verifier.verify("alice", self.wrong(), context).result for _ in range(times)]


@pytest.fixture
def env(mfa_env: MfaEnv, enroll: Enroll, lib: type[Lib]) -> Env:
    store = mfa_env.open(mfa_env.initialise(LOCKOUT))
    enroll(store, "alice", SECRET)
    enroll(store, "bob", BOB_SECRET)
    return Env(mfa_env, store, mfa_env.verifier(store), lib)


def test_locked_after_max_failures_even_for_the_right_code(env: Env) -> None:
    assert env.fail(2) == [Result.BAD_CODE, Result.BAD_CODE]
    assert not env.state().locked_at(env.clock())
    wrong_decision = env.verifier.verify("alice", env.wrong(), CTX)
    assert wrong_decision.result is Result.BAD_CODE  # the third failure itself is reported as what it was
    state = env.state()
    assert state.locked_at(env.clock())
    assert state.locked_until == env.clock() + 300
    assert state.consecutive_failures == 3

    locked = env.verifier.verify("alice", env.right(), CTX)

    assert locked.result is Result.LOCKED
    assert not locked.accepted
    # From outside, a locked account looks exactly like a wrong code.
    assert locked.public_message == wrong_decision.public_message == PUBLIC_FAILURE_MESSAGE
    # The right code was not consumed while locked.
    (device,) = env.store.list_devices("alice")
    assert device.last_step is None


def test_attempts_while_locked_change_nothing(env: Env) -> None:
    env.fail(3)
    before = env.state()
    assert before.locked_at(env.clock())
    for _ in range(5):
        assert env.verifier.verify("alice", env.wrong(), CTX).result is Result.LOCKED
        assert env.verifier.verify("alice", env.right(), Context(service="radius")).result is Result.LOCKED
        env.clock.advance(10)
    after = env.state()
    assert (after.failures, after.consecutive_failures) == (before.failures, before.consecutive_failures)
    assert after.locked_until == before.locked_until
    assert after.last_failure_at == before.last_failure_at
    assert not after.hard_locked


def test_lock_ends_after_lock_seconds_and_success_resets(env: Env) -> None:
    env.fail(3)
    locked_until = env.state().locked_until
    assert locked_until is not None

    env.clock.set(locked_until - 1)
    assert env.verifier.verify("alice", env.right(), CTX).result is Result.LOCKED

    env.clock.set(locked_until)
    decision = env.verifier.verify("alice", env.right(), CTX)
    assert decision.result is Result.ACCEPTED, decision
    state = env.state()
    assert (state.failures, state.consecutive_failures) == (0, 0)
    assert not state.locked_at(env.clock())
    assert state.last_success_at == env.clock()


def test_success_resets_the_failure_count(env: Env) -> None:
    env.fail(2)
    assert env.verifier.verify("alice", env.right(), CTX).result is Result.ACCEPTED
    env.clock.advance(30)
    assert env.fail(2) == [Result.BAD_CODE, Result.BAD_CODE]
    state = env.state()
    assert not state.locked_at(env.clock())
    assert (state.failures, state.consecutive_failures) == (2, 2)


def test_replays_count_as_failures(env: Env) -> None:
    code = env.right()
    assert env.verifier.verify("alice", code, CTX).result is Result.ACCEPTED
    results = [env.verifier.verify("alice", code, CTX).result for _ in range(3)]
    assert results == [Result.REPLAY] * 3
    assert env.state().locked_at(env.clock())
    env.clock.advance(30)
    assert env.verifier.verify("alice", env.right(), CTX).result is Result.LOCKED


def test_hard_lock_persists_until_an_administrator_unlocks(env: Env) -> None:
    for round_ in range(3):  # 3 temporary locks = 9 consecutive failures
        env.fail(3)
        state = env.state()
        assert state.locked_at(env.clock()) and not state.hard_locked, round_
        env.clock.advance(300)
    assert env.state().consecutive_failures == 9
    assert not env.state().locked_at(env.clock())

    env.fail(1)  # the tenth consecutive failure
    state = env.state()
    assert state.hard_locked
    assert state.consecutive_failures == 10

    for wait in (300, 3600, 30 * 86400):
        env.clock.advance(wait)
        decision = env.verifier.verify("alice", env.right(), CTX)
        assert decision.result is Result.LOCKED, wait
        assert decision.public_message == PUBLIC_FAILURE_MESSAGE
    assert env.state().consecutive_failures == 10

    before = env.manager.unlock("alice", Context(service="mfa-admin"))
    assert before.hard_locked

    state = env.state()
    assert not state.hard_locked and state.locked_until is None
    assert (state.failures, state.consecutive_failures) == (0, 0)
    assert env.verifier.verify("alice", env.right(), CTX).result is Result.ACCEPTED


def test_failures_from_every_service_share_one_counter(env: Env) -> None:
    for service in ("sshd", "radius", "sudo"):
        assert env.verifier.verify("alice", env.wrong(), Context(service=service)).result is Result.BAD_CODE
    assert env.state().consecutive_failures == 3
    # Locked for every door, whichever one the failures came through.
    for service in ("sshd", "radius", "login"):
        assert env.verifier.verify("alice", env.right(), Context(service=service)).result is Result.LOCKED


def test_one_users_lock_does_not_touch_another(env: Env) -> None:
    env.fail(3)
    assert env.state("alice").locked_at(env.clock())
    assert env.state("bob") == LockState()
    bob_code = env.lib.code(BOB_SECRET, env.clock())
    assert env.verifier.verify("bob", bob_code, CTX).result is Result.ACCEPTED


def test_lock_and_unlock_are_audited(env: Env) -> None:
    env.fail(3)
    env.clock.advance(300)
    env.fail(3)
    env.clock.advance(300)
    env.fail(3)
    env.clock.advance(300)
    env.fail(1)
    env.manager.unlock("alice", Context(service="mfa-admin"))

    rows = env.store.audit_rows(user="alice")
    locks = [r for r in rows if r.event == "lock"]
    assert [r.reason for r in locks] == ["lock", "lock", "lock", "hard lock"]
    assert [r.detail["consecutive_failures"] for r in locks] == [3, 6, 9, 10]
    assert locks[0].detail.get("locked_for_seconds") == 300
    unlocks = [r for r in rows if r.event == "unlock"]
    assert len(unlocks) == 1
    assert unlocks[0].service == "mfa-admin"
    assert unlocks[0].detail["was_hard_locked"] is True
    assert unlocks[0].id > locks[-1].id
    assert env.store.verify_audit().ok


def test_locked_attempts_are_audited(env: Env) -> None:
    env.fail(3)
    env.verifier.verify("alice", env.right(), Context(service="sshd", remote_host="192.0.2.7"))
    last = env.store.audit_rows(user="alice")[-1]
    assert last.event == "auth"
    assert last.reason == "locked"
    assert last.service == "sshd"
    assert last.source == "192.0.2.7"


def test_a_batch_counts_failures_in_order(env: Env) -> None:
    attempts = [("alice", env.wrong(), CTX)] * 3 + [("alice", env.right(), CTX), ("bob", env.wrong(), CTX)]
    decisions = env.verifier.verify_batch(attempts)
    assert [d.result for d in decisions] == [Result.BAD_CODE] * 3 + [Result.LOCKED, Result.BAD_CODE]
    assert env.state().locked_at(env.clock())
    assert env.state("bob").failures == 1
