"""HOTP tokens (RFC 4226): look-ahead, replay, re-synchronisation and races, on the RFC's own seed."""

from __future__ import annotations

import traceback
from typing import TYPE_CHECKING, Any

import pytest

from devicedb.errors import DuplicateDeviceError, InvalidInput
from devicedb.kinds import hotp
from devicedb.manage import DeviceManager
from devicedb.models import Context, Result
from devicedb.settings import parse_settings
from devicedb.store import Store
from devicedb.verifier import Verifier

if TYPE_CHECKING:
    from conftest import Lib, MfaEnv

SEED = b"12345678901234567890"
# RFC 4226 Appendix D, counters 0-9, and counters 12-13 of the same seed.
RFC4226 = ["755224", "287082", "359152", "969429", "338314", "254676", "287922", "162583", "399871", "520489"]
C12, C13 = "868912", "736127"
CTX = Context(service="test")
EASY_LOCKOUT = "lockout:\n  max_failures: 100\n  hard_lock_after: 100\n"


def next_counter(store: Store, user: str = "alice") -> int | None:
    (device,) = store.list_devices(user)
    return device.next_counter


def test_rfc4226_vectors() -> None:
    assert [hotp.code_at(SEED, 6, "sha1", c) for c in range(10)] == RFC4226
    assert [hotp.code_at(SEED, 6, "sha1", c) for c in (12, 13)] == [C12, C13]


def test_look_ahead_replay_and_resync(mfa_env: MfaEnv) -> None:
    """The issue's sequence: next=0, look-ahead 3."""
    settings = mfa_env.initialise(EASY_LOCKOUT)
    store = mfa_env.open(settings)
    verifier = mfa_env.verifier(store)
    DeviceManager(store).enroll_hotp("alice", CTX, secret=SEED, look_ahead=3, resync_window=100)
    assert next_counter(store) == 0

    assert verifier.verify("alice", "359152", CTX).result is Result.ACCEPTED  # counter 2
    assert next_counter(store) == 3
    assert verifier.verify("alice", "359152", CTX).result is Result.REPLAY
    assert verifier.verify("alice", "287082", CTX).result is Result.REPLAY  # counter 1, below next
    assert next_counter(store) == 3
    assert verifier.verify("alice", "254676", CTX).result is Result.ACCEPTED  # counter 5
    assert next_counter(store) == 6
    assert verifier.verify("alice", C12, CTX).result is Result.BAD_CODE  # far ahead, alone
    assert next_counter(store) == 6
    assert verifier.verify("alice", C13, CTX).result is Result.ACCEPTED  # its successor: resync
    assert next_counter(store) == 14
    assert verifier.verify("alice", C13, CTX).result is Result.REPLAY


def test_resync_needs_the_very_next_code_and_expires(mfa_env: MfaEnv, lib: type[Lib]) -> None:
    settings = mfa_env.initialise(EASY_LOCKOUT)
    store = mfa_env.open(settings)
    verifier = mfa_env.verifier(store)
    DeviceManager(store).enroll_hotp("alice", CTX, secret=SEED, look_ahead=3)
    far = [hotp.code_at(SEED, 6, "sha1", c) for c in range(20, 24)]
    # Two far codes that are not consecutive do not resync.
    assert verifier.verify("alice", far[0], CTX).result is Result.BAD_CODE
    assert verifier.verify("alice", far[2], CTX).result is Result.BAD_CODE
    assert next_counter(store) == 0
    # A consecutive pair too far apart in time does not either.
    assert verifier.verify("alice", far[1], CTX).result is Result.BAD_CODE  # now waiting on 21
    mfa_env.clock.advance(hotp.RESYNC_SECONDS + 1)
    assert verifier.verify("alice", far[2], CTX).result is Result.BAD_CODE
    assert next_counter(store) == 0
    # Beyond the resync window nothing is remembered at all.
    beyond = hotp.code_at(SEED, 6, "sha1", 500)
    assert verifier.verify("alice", beyond, CTX).result is Result.BAD_CODE
    assert verifier.verify("alice", hotp.code_at(SEED, 6, "sha1", 501), CTX).result is Result.BAD_CODE
    # The code for counter 0 still works: failures never moved the counter.
    assert verifier.verify("alice", RFC4226[0], CTX).result is Result.ACCEPTED
    assert next_counter(store) == 1


def test_admin_resync(mfa_env: MfaEnv) -> None:
    settings = mfa_env.initialise()
    store = mfa_env.open(settings)
    manager = DeviceManager(store)
    device = manager.enroll_hotp("alice", CTX, secret=SEED)
    first, second = (hotp.code_at(SEED, 6, "sha1", c) for c in (4000, 4001))
    with pytest.raises(InvalidInput):
        manager.resync("alice", device.id, second, first, CTX)  # wrong order
    assert next_counter(store) == 0
    assert manager.resync("alice", device.id, first, second, CTX) == 4002
    assert next_counter(store) == 4002
    assert store.audit_rows()[-1].event == "device_resynced"
    with pytest.raises(InvalidInput):
        manager.resync("alice", device.id, first, second, CTX)  # never backwards


def test_hotp_and_totp_share_one_secret_space(mfa_env: MfaEnv) -> None:
    settings = mfa_env.initialise()
    store = mfa_env.open(settings)
    manager = DeviceManager(store)
    manager.enroll_hotp("alice", CTX, secret=SEED)
    with pytest.raises(DuplicateDeviceError):
        manager.enroll_totp("bob", CTX, secret=SEED, pending=False)


def test_weak_seed_is_kept_and_flagged(mfa_env: MfaEnv) -> None:
    settings = mfa_env.initialise()
    store = mfa_env.open(settings)
    device = DeviceManager(store).enroll_hotp("alice", CTX, secret=SEED[:10])
    assert device.params["weak"] is True
    assert device.public_dict()["weak"] is True
    verifier = mfa_env.verifier(store)
    assert verifier.verify("alice", hotp.code_at(SEED[:10], 6, "sha1", 0), CTX).accepted
    with pytest.raises(InvalidInput):
        DeviceManager(store).enroll_hotp("bob", CTX, secret=SEED[:9])


def _race_worker(barrier: Any, queue: Any, index: int, yaml_text: str, codes: list[str], t: float) -> None:
    try:
        settings = parse_settings(yaml_text)
        results = []
        with Store.open(settings, clock=lambda: t) as store:
            verifier = Verifier(settings, store=store, clock=lambda: t)
            for code in codes:
                barrier.wait(timeout=60)
                results.append(verifier.verify("alice", code, Context(service=f"p{index}")).result.value)
        queue.put((index, True, results))
    except BaseException:
        queue.put((index, False, traceback.format_exc()))


@pytest.mark.slow
def test_two_processes_same_hotp_code_exactly_one_accepted(mfa_env: MfaEnv, lib: type[Lib]) -> None:
    settings = mfa_env.initialise(EASY_LOCKOUT)
    store = mfa_env.open(settings)
    DeviceManager(store).enroll_hotp("alice", CTX, secret=SEED)
    codes = RFC4226[:6]
    a, b = lib.run_processes(_race_worker, [(mfa_env.yaml(EASY_LOCKOUT), codes, lib.T0)] * 2)
    for k, pair in enumerate(zip(a, b, strict=True)):
        assert sorted(pair) == ["accepted", "replay"], f"code {k}: {pair}"
    assert next_counter(store) == 6
