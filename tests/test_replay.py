"""Replay protection for TOTP: the last accepted step only moves forward, and races have one winner."""

from __future__ import annotations

import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pytest

from devicedb.kinds import totp
from devicedb.models import Advance, Context, Result
from devicedb.settings import parse_settings
from devicedb.store import Store
from devicedb.verifier import Verifier

if TYPE_CHECKING:
    from conftest import Enroll, Lib, MfaEnv

CTX = Context(service="test")
SEED = b"12345678901234567890"  # the RFC 6238 SHA1 seed
WINDOW_1 = "totp:\n  window: 1\n"
# Generous lockout, so that the replays these tests provoke never lock the user.
EASY_LOCKOUT = "lockout:\n  max_failures: 100\n  hard_lock_after: 100\n"


@dataclass
class Env:
    mfa_env: MfaEnv
    store: Store
    verifier: Verifier
    t0: int
    code: Callable[[float], str]  # the 6-digit SHA1 code at a time

    def verify(self, response: str, context: Context = CTX) -> Result:
        return self.verifier.verify("alice", response, context).result

    def last_step(self) -> int | None:
        (device,) = self.store.list_devices("alice")
        return device.last_step


@pytest.fixture
def env(mfa_env: MfaEnv, enroll: Enroll, lib: type[Lib]) -> Env:
    store = mfa_env.open(mfa_env.initialise(WINDOW_1 + EASY_LOCKOUT))
    enroll(store, "alice", SEED, digits=6)
    assert mfa_env.clock() == lib.T0
    return Env(mfa_env, store, mfa_env.verifier(store), lib.T0, lambda t: lib.code(SEED, t, digits=6))


def test_accepted_code_is_a_replay_a_second_later(env: Env) -> None:
    t0, clock = env.t0, env.mfa_env.clock
    now_code = env.code(t0)
    assert env.verify(now_code) is Result.ACCEPTED
    assert env.last_step() == t0 // 30

    clock.advance(1)
    assert clock() // 30 == t0 // 30  # still the same step
    decision = env.verifier.verify("alice", now_code, CTX)
    assert decision.result is Result.REPLAY
    assert not decision.accepted
    assert env.last_step() == t0 // 30

    # Still a replay once its step has passed but it is inside the window, not merely a bad code.
    clock.advance(30)
    assert env.verify(now_code) is Result.REPLAY


def test_codes_of_earlier_steps_are_rejected_after_a_later_step(env: Env) -> None:
    t0 = env.t0
    assert env.verify(env.code(t0)) is Result.ACCEPTED
    env.mfa_env.clock.set(t0 + 60)
    assert env.verify(env.code(t0 + 60)) is Result.ACCEPTED
    # The code of the step in between was never used, and is inside the window of "now", but it is older.
    between = env.code(t0 + 30)
    assert between not in {env.code(t0), env.code(t0 + 60)}
    assert env.verify(between) is Result.REPLAY
    assert env.last_step() == (t0 + 60) // 30


def test_future_step_in_window_then_current_step_is_a_replay(env: Env) -> None:
    t0 = env.t0
    assert env.verify(env.code(t0 + 30)) is Result.ACCEPTED  # step +1
    assert env.last_step() == t0 // 30 + 1
    assert env.verify(env.code(t0)) is Result.REPLAY
    assert env.verify(env.code(t0 - 30)) is Result.REPLAY


def test_clock_set_back_does_not_reopen_used_steps(env: Env) -> None:
    t0, clock = env.t0, env.mfa_env.clock
    later = t0 + 10 * 30
    clock.set(later)
    assert env.verify(env.code(later)) is Result.ACCEPTED

    clock.set(t0)  # the clock moves back by ten steps
    for t in (t0 - 30, t0, t0 + 30):
        decision = env.verifier.verify("alice", env.code(t), CTX)
        assert decision.result is Result.REPLAY, (t, decision)
    assert env.last_step() == later // 30

    # Once time is past the last used step again, fresh codes work.
    clock.set(later + 30)
    assert env.verify(env.code(later + 30)) is Result.ACCEPTED


@pytest.mark.parametrize(
    ("window", "offset", "accepted"),
    [
        (1, -2, False),
        (1, -1, True),
        (1, 0, True),
        (1, 1, True),
        (1, 2, False),
        (0, -1, False),
        (0, 0, True),
        (0, 1, False),
        (2, -2, True),
        (2, 2, True),
        (2, 3, False),
    ],
)
def test_window(mfa_env: MfaEnv, enroll: Enroll, lib: type[Lib], window: int, offset: int, accepted: bool) -> None:
    t0 = lib.T0
    store = mfa_env.open(mfa_env.initialise(f"totp:\n  window: {window}\n"))
    enroll(store, "alice", SEED, digits=6)
    verifier = mfa_env.verifier(store)
    presented = lib.code(SEED, t0 + 30 * offset)
    in_window = {lib.code(SEED, t0 + 30 * k) for k in range(-window, window + 1)}
    if not accepted:
        # The presented code must not collide with a valid one, or the test would mean nothing.
        assert presented not in in_window

    decision = verifier.verify("alice", presented, CTX)

    (device,) = store.list_devices("alice")
    if accepted:
        assert decision.result is Result.ACCEPTED
        assert device.last_step == t0 // 30 + offset
    else:
        assert decision.result is Result.BAD_CODE
        assert device.last_step is None


def test_window_both_edges_in_order(env: Env) -> None:
    """With window 1: -2 and +2 rejected, then -1 and +1 (in that order) both accepted."""
    t0 = env.t0
    assert env.verify(env.code(t0 - 60)) is Result.BAD_CODE
    assert env.verify(env.code(t0 + 60)) is Result.BAD_CODE
    assert env.verify(env.code(t0 - 30)) is Result.ACCEPTED
    assert env.verify(env.code(t0 + 30)) is Result.ACCEPTED
    assert env.last_step() == t0 // 30 + 1


def test_replay_is_per_device(mfa_env: MfaEnv, enroll: Enroll, lib: type[Lib]) -> None:
    """Two users with different secrets: one user's accepted step does not burn the other's."""
    store = mfa_env.open(mfa_env.initialise(WINDOW_1))
    other = lib.secret_for(2)
    enroll(store, "alice", SEED)
    enroll(store, "bob", other)
    verifier = mfa_env.verifier(store)
    assert verifier.verify("alice", lib.code(SEED, lib.T0), CTX).result is Result.ACCEPTED
    assert verifier.verify("bob", lib.code(other, lib.T0), CTX).result is Result.ACCEPTED
    assert verifier.verify("bob", lib.code(other, lib.T0), CTX).result is Result.REPLAY


def test_match_flags_steps_at_or_below_the_last_step_as_replays(env: Env) -> None:
    """The TOTP kind itself: a match at or below last_step is a replay, above it is not."""
    t0 = env.t0
    (device,) = env.store.list_devices("alice")
    step = t0 // 30
    device.last_step = step
    same = totp.match(device, SEED, env.code(t0), t0, 1)
    assert same is not None and same.replay and same.advance == Advance("last_step", step)
    older = totp.match(device, SEED, env.code(t0 - 30), t0, 1)
    assert older is not None and older.replay
    newer = totp.match(device, SEED, env.code(t0 + 30), t0, 1)
    assert newer is not None and not newer.replay and newer.offset == 1
    assert totp.match(device, SEED, env.code(t0 + 90), t0, 1) is None


def test_the_conditional_update_refuses_to_go_back(env: Env) -> None:
    """Replay state moves only forward, decided by the UPDATE's row count, even for a stale Device."""
    t0 = env.t0
    (stale,) = env.store.list_devices("alice")  # read before anyone advanced it
    step = t0 // 30
    with env.store.transaction() as tx:
        assert tx.advance(stale, Advance("last_step", step)) is True
    with env.store.transaction() as tx:
        assert tx.advance(stale, Advance("last_step", step)) is False  # the same step again
        assert tx.advance(stale, Advance("last_step", step - 3)) is False  # backwards
    assert env.last_step() == step
    with env.store.transaction() as tx:
        assert tx.advance(stale, Advance("last_step", step + 1)) is True
    assert env.last_step() == step + 1
    with pytest.raises(ValueError), env.store.transaction() as tx:
        tx.advance(stale, Advance("enabled", 1))  # only replay fields may move


# ---------------------------------------------------------------------------
# Two processes, each with its own connection, presenting the same fresh code at once.


def _race_worker(
    barrier: Any, queue: Any, index: int, yaml_text: str, rounds: list[tuple[float, str]], service: str
) -> None:
    """Spawned: open an own Store, then verify each round's code at the barrier."""
    try:
        settings = parse_settings(yaml_text)
        now = [rounds[0][0]]
        results = []
        with Store.open(settings, clock=lambda: now[0]) as store:
            verifier = Verifier(settings, store=store, clock=lambda: now[0])
            for t, presented in rounds:
                now[0] = t
                barrier.wait(timeout=60)
                results.append(verifier.verify("alice", presented, Context(service=service)).result.value)
        queue.put((index, True, results))
    except BaseException:
        queue.put((index, False, traceback.format_exc()))


@pytest.mark.slow
def test_two_processes_same_code_exactly_one_accepted(env: Env, lib: type[Lib]) -> None:
    t0 = env.t0
    rounds = [(float(t0 + 30 * k), env.code(t0 + 30 * k)) for k in range(6)]
    assert len({c for _, c in rounds}) == len(rounds)  # a fresh code every round
    yaml_text = env.mfa_env.yaml(WINDOW_1 + EASY_LOCKOUT)

    a, b = lib.run_processes(_race_worker, [(yaml_text, rounds, "sshd"), (yaml_text, rounds, "radius")])

    for k, pair in enumerate(zip(a, b, strict=True)):
        assert sorted(pair) == ["accepted", "replay"], f"round {k}: {pair}"
    assert env.last_step() == (t0 + 30 * 5) // 30
    rows = env.store.audit_rows(user="alice")
    assert len([r for r in rows if r.event == "auth" and r.reason == "accepted"]) == len(rounds)
    assert len([r for r in rows if r.event == "auth" and r.reason and r.reason.startswith("replay")]) == len(rounds)


def test_a_batch_sees_its_own_earlier_attempts(env: Env) -> None:
    """Group commit: attempts in one batch are decided in order, so a repeated code is a replay."""
    code = env.code(env.t0)
    decisions = env.verifier.verify_batch(
        [("alice", code, CTX), ("alice", code, Context(service="radius")), ("alice\x00", code, CTX)]
    )
    assert [d.result for d in decisions] == [Result.ACCEPTED, Result.REPLAY, Result.ERROR]
    assert env.last_step() == env.t0 // 30
    assert env.verify(code) is Result.REPLAY  # and the batch was committed
