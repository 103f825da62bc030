"""Hardware TOTP tokens: the clock drift is learned from each success, and an admin can resync."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from devicedb.errors import InvalidInput
from devicedb.kinds import totp
from devicedb.manage import DeviceManager
from devicedb.models import Context, Result

if TYPE_CHECKING:
    from conftest import MfaEnv

SEED = bytes(range(1, 21))
CTX = Context(service="test")
SETTINGS = "totp:\n  window: 1\nlockout:\n  max_failures: 100\n  hard_lock_after: 100\n"


def token_code(now: float, steps_ahead: int) -> str:
    """What a token whose clock runs ``steps_ahead`` steps fast shows at ``now``."""
    return totp.code_at(SEED, 6, "sha1", 30, now + 30 * steps_ahead)


def test_drift_is_learned_so_a_runaway_clock_stays_inside_the_window(mfa_env: MfaEnv) -> None:
    store = mfa_env.open(mfa_env.initialise(SETTINGS))
    verifier = mfa_env.verifier(store)
    DeviceManager(store).enroll_totp("alice", CTX, secret=SEED, pending=False, hardware=True)
    clock = mfa_env.clock
    for ahead in (1, 2, 3, 4):
        clock.advance(3600)
        assert verifier.verify("alice", token_code(clock(), ahead), CTX).result is Result.ACCEPTED, ahead
        (device,) = store.list_devices("alice")
        assert device.drift == ahead
    # Four steps fast is far outside a ±1 window around the real time, and still accepted.
    assert store.list_devices("alice")[0].public_dict()["drift"] == 4


def test_an_app_does_not_learn_drift(mfa_env: MfaEnv) -> None:
    store = mfa_env.open(mfa_env.initialise(SETTINGS))
    verifier = mfa_env.verifier(store)
    DeviceManager(store).enroll_totp("alice", CTX, secret=SEED, pending=False)
    clock = mfa_env.clock
    assert verifier.verify("alice", token_code(clock(), 1), CTX).result is Result.ACCEPTED
    clock.advance(3600)
    assert verifier.verify("alice", token_code(clock(), 2), CTX).result is Result.BAD_CODE
    assert store.list_devices("alice")[0].drift == 0


def test_admin_resync_of_a_token_far_off(mfa_env: MfaEnv) -> None:
    store = mfa_env.open(mfa_env.initialise(SETTINGS))
    verifier = mfa_env.verifier(store)
    manager = DeviceManager(store)
    device = manager.enroll_totp("alice", CTX, secret=SEED, pending=False, hardware=True).device
    now = mfa_env.clock()
    assert verifier.verify("alice", token_code(now, 50), CTX).result is Result.BAD_CODE
    with pytest.raises(InvalidInput):
        manager.resync("alice", device.id, token_code(now, 51), token_code(now, 50), CTX)  # wrong order
    assert manager.resync("alice", device.id, token_code(now, 50), token_code(now, 51), CTX) == 51
    # The two resync codes are used up; the next one the token shows works.
    assert verifier.verify("alice", token_code(now, 51), CTX).result is Result.REPLAY
    assert verifier.verify("alice", token_code(now, 52), CTX).result is Result.ACCEPTED


def test_vendor_seed_of_80_bits_is_kept_and_flagged(mfa_env: MfaEnv) -> None:
    store = mfa_env.open(mfa_env.initialise(SETTINGS))
    enrollment = DeviceManager(store).enroll_totp("alice", CTX, secret=SEED[:10], pending=False, hardware=True)
    assert enrollment.device.params == {"hardware": True, "weak": True}
    verifier = mfa_env.verifier(store)
    now = mfa_env.clock()
    assert verifier.verify("alice", totp.code_at(SEED[:10], 6, "sha1", 30, now), CTX).accepted
    with pytest.raises(InvalidInput):
        DeviceManager(store).enroll_totp("bob", CTX, secret=SEED[:10], pending=False)  # an app needs 128 bits


def test_admin_resync_reaches_an_hour_only(mfa_env: MfaEnv) -> None:
    """A resync moves the replay state forward for good: a pair of codes from far ahead is refused."""
    store = mfa_env.open(mfa_env.initialise(SETTINGS))
    manager = DeviceManager(store)
    device = manager.enroll_totp("alice", CTX, secret=SEED, pending=False, hardware=True).device
    now = mfa_env.clock()
    far = 2880  # a day of 30-second steps ahead
    with pytest.raises(InvalidInput, match="within an hour"):
        manager.resync("alice", device.id, token_code(now, far), token_code(now, far + 1), CTX)
    assert store.list_devices("alice")[0].last_step is None
