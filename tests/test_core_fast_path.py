"""The verify path's shortcuts keep its meaning: the OATH arithmetic, the transaction's read cache
inside a group commit, and the audit chain's cached head across a rolled-back savepoint."""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

import pyotp
import pytest

from devicedb.kinds import totp
from devicedb.manage import DeviceManager
from devicedb.models import Context, Result
from devicedb.store import Store
from devicedb.verifier import Verifier

if TYPE_CHECKING:
    from conftest import Clock, Enroll, MfaEnv

CTX = Context(service="radius", client="nas1")
SEED = bytes(range(20))


def code(now: float, secret: bytes = SEED) -> str:
    return totp.code_at(secret, 6, "sha1", 30, now)


def wrong(now: float) -> str:
    right = {code(now + d * 30) for d in (-1, 0, 1)}
    return next(c for c in ("000000", "111111", "222222", "333333") if c not in right)


@pytest.mark.parametrize("algorithm", ["sha1", "sha256", "sha512"])
@pytest.mark.parametrize("digits", [6, 8])
def test_fast_oath_codes_equal_pyotp(algorithm: str, digits: int) -> None:
    rng = random.Random(f"{algorithm}-{digits}")
    # Key lengths on both sides of every hash's block size (64 and 128 bytes), where RFC 2104 hashes the key.
    for length in (1, 10, 20, 32, 63, 64, 65, 127, 128, 129, 200):
        secret = rng.randbytes(length)
        reference = totp.otp(secret, digits, algorithm)  # pyotp's own generate_otp
        assert isinstance(reference, pyotp.OTP)
        fast = totp.codes(secret, digits, algorithm)
        for counter in (0, 1, 59, 2**31, 2**63 - 1, *(rng.randrange(2**40) for _ in range(20))):
            assert fast.generate_otp(counter) == reference.generate_otp(counter), (length, counter)


def test_lockout_reached_inside_one_batch_stops_a_right_code_in_the_same_batch(
    mfa_env: MfaEnv, clock: Clock, enroll: Enroll
) -> None:
    settings = mfa_env.initialise("lockout:\n  max_failures: 3\n")
    store = mfa_env.open(settings)
    verifier = mfa_env.verifier(store)
    enroll(store, "alice", SEED)
    now = clock()
    attempts = [("alice", wrong(now), CTX)] * 3 + [("alice", code(now), CTX)]
    decisions = verifier.verify_batch(attempts)
    assert [d.result for d in decisions] == [Result.BAD_CODE] * 3 + [Result.LOCKED]
    assert store.lock_state("alice").locked_at(clock())


def test_a_backup_code_twice_in_one_batch_is_used_once(store: Store, verifier: Verifier, enroll: Enroll) -> None:
    enroll(store, "alice", SEED)
    codes = DeviceManager(store).generate_backup_codes("alice", CTX)
    decisions = verifier.verify_batch([("alice", codes[0], CTX), ("alice", codes[0], CTX)])
    assert [d.result for d in decisions] == [Result.ACCEPTED, Result.REPLAY]
    assert store.backup_codes_left("alice") == len(codes) - 1


def test_a_success_inside_one_batch_resets_the_failures_a_later_attempt_sees(
    mfa_env: MfaEnv, clock: Clock, enroll: Enroll
) -> None:
    settings = mfa_env.initialise("lockout:\n  max_failures: 3\n")
    store = mfa_env.open(settings)
    verifier = mfa_env.verifier(store)
    enroll(store, "alice", SEED)
    now = clock()
    bad = ("alice", wrong(now), CTX)
    decisions = verifier.verify_batch([bad, bad, ("alice", code(now), CTX), bad, bad])
    assert [d.result for d in decisions] == [Result.BAD_CODE, Result.BAD_CODE, Result.ACCEPTED] + [Result.BAD_CODE] * 2
    assert not store.lock_state("alice").locked_at(clock())


def test_writes_the_cache_was_not_told_about_drop_every_cached_read(store: Store, enroll: Enroll) -> None:
    device_id = enroll(store, "alice", SEED).device.id
    with store.transaction() as tx:
        assert tx.devices("alice")[0].enabled
        assert tx.set_enabled("alice", device_id, False)  # not a write the cache tracks
        assert not tx.devices("alice")[0].enabled
        tx.conn.execute("INSERT INTO lockout (user, failures) VALUES ('alice', 4)")  # raw SQL, not a Tx write
        assert tx.lock_state("alice").failures == 4


def test_prefetched_reads_are_what_single_reads_give(store: Store, enroll: Enroll) -> None:
    enroll(store, "alice", SEED)
    enroll(store, "bob", bytes(range(20, 40)))
    DeviceManager(store).generate_backup_codes("bob", CTX)
    with store.transaction() as tx:
        single = {u: (tx.devices(u), tx.lock_state(u), tx.backup_codes_left(u)) for u in ("alice", "bob", "nobody")}
    with store.transaction() as tx:
        tx.prefetch(["alice", "bob", "nobody"])
        fetched = {u: (tx.devices(u), tx.lock_state(u), tx.backup_codes_left(u)) for u in ("alice", "bob", "nobody")}
    assert fetched == single
    assert single["nobody"] == ([], single["nobody"][1], 0) and single["bob"][2] > 0


def test_an_audit_row_rolled_back_with_its_savepoint_leaves_the_chain_whole(store: Store) -> None:
    with store.transaction() as tx:
        tx.audit("auth", "alice", CTX, reason="kept before")
        with pytest.raises(RuntimeError), tx.savepoint():
            tx.audit("auth", "alice", CTX, reason="rolled back")
            raise RuntimeError("the attempt broke")
        tx.audit("auth", "alice", CTX, reason="kept after")
    reasons = [r.reason for r in store.audit_rows(user="alice")]
    assert reasons == ["kept before", "kept after"]
    report = store.verify_audit()
    assert report.ok, report


def test_backup_codes_in_a_batch_as_bytes_and_with_a_dash(store: Store, verifier: Verifier, enroll: Enroll) -> None:
    enroll(store, "alice", SEED)
    codes = DeviceManager(store).generate_backup_codes("alice", CTX)
    assert all("-" in c for c in codes)  # shown as two groups of five
    decisions = verifier.verify_batch([("alice", codes[0].encode(), CTX), ("alice", codes[1].replace("-", ""), CTX)])
    assert [d.result for d in decisions] == [Result.ACCEPTED, Result.ACCEPTED]
    assert store.backup_codes_left("alice") == len(codes) - 2
