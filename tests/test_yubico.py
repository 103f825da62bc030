"""Yubico OTP, checked with the test key and OTPs Yubico published (AES key 0682952d…, uid c5fc55c3767f)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from devicedb.errors import InvalidInput
from devicedb.kinds import yubico
from devicedb.manage import DeviceManager
from devicedb.models import Context, Result

if TYPE_CHECKING:
    from conftest import MfaEnv

AES_KEY = bytes.fromhex("0682952d3363f225654b58a73b131259")
PRIVATE_ID = bytes.fromhex("c5fc55c3767f")
PUBLIC_ID = "ndgtriluugng"
# In the order the key produced them: (use counter, session use) = (13,0) (13,1) (13,2) (13,3) (14,0) (14,1) (15,0).
OTPS = [
    PUBLIC_ID + token
    for token in (
        "kuhguutjdfihfkleuvnjtjiljkbtbngb",
        "hggtkhvrbbrrgtdfeivgklbkviteggcu",
        "vlbnjllchllugvhhftndludrjubuuvkh",
        "vukkrdlbvnettvhdhcjfgtjljkufulfe",
        "nfdeicbdnfhlinhjvkufikdvbunjjvbn",
        "bclrcivunvrbghicrfkeflvgrkdrfbve",
        "vkdlfkvljfcvbehdvbtelhuutgdhfdku",
    )
]
CTX = Context(service="test")
EASY_LOCKOUT = "lockout:\n  max_failures: 100\n  hard_lock_after: 100\n"


def test_published_otps_decode_to_the_published_fields() -> None:
    expected = [(13, 0), (13, 1), (13, 2), (13, 3), (14, 0), (14, 1), (15, 0)]
    for otp, (use, session) in zip(OTPS, expected, strict=True):
        parsed = yubico.parse(AES_KEY + PRIVATE_ID, otp)
        assert parsed is not None
        assert parsed[0] == PRIVATE_ID
        assert parsed[1] == (use << 8) | session
    assert yubico.modhex_encode(bytes.fromhex("c5fc55c3767f")) == "rgvrggreihiv"  # the published modhex uid


def enrolled(mfa_env: MfaEnv):  # type: ignore[no-untyped-def]
    settings = mfa_env.initialise(EASY_LOCKOUT)
    store = mfa_env.open(settings)
    DeviceManager(store).enroll_yubico("alice", CTX, public_id=PUBLIC_ID, private_id=PRIVATE_ID, aes_key=AES_KEY)
    return store, mfa_env.verifier(store)


def test_counters_must_strictly_increase(mfa_env: MfaEnv) -> None:
    store, verifier = enrolled(mfa_env)
    assert verifier.verify("alice", OTPS[1], CTX).result is Result.ACCEPTED
    assert verifier.verify("alice", OTPS[1], CTX).result is Result.REPLAY  # the same OTP again
    assert verifier.verify("alice", OTPS[0], CTX).result is Result.REPLAY  # an older one
    assert verifier.verify("alice", OTPS[4], CTX).result is Result.ACCEPTED  # skipping ahead is fine
    assert verifier.verify("alice", OTPS[3], CTX).result is Result.REPLAY
    assert verifier.verify("alice", OTPS[6], CTX).result is Result.ACCEPTED
    (device,) = store.list_devices("alice")
    assert device.next_counter == (15 << 8) + 1


def test_wrong_public_id_bad_crc_and_wrong_private_id_fail(mfa_env: MfaEnv) -> None:
    store, verifier = enrolled(mfa_env)
    other_public = "cccccccccccc" + OTPS[0][12:]
    assert verifier.verify("alice", other_public, CTX).result is Result.BAD_CODE
    flipped = OTPS[0][:-1] + ("c" if OTPS[0][-1] != "c" else "b")  # one token nibble changed: CRC fails
    assert verifier.verify("alice", flipped, CTX).result is Result.BAD_CODE
    assert verifier.verify("alice", OTPS[0].upper(), CTX).result is Result.BAD_CODE
    assert verifier.verify("alice", OTPS[0][:43], CTX).result is Result.BAD_CODE
    # A key enrolled with another private id: the token decrypts, but is not this key's.
    DeviceManager(store).enroll_yubico(
        "bob", CTX, public_id=PUBLIC_ID, private_id=bytes(6), aes_key=bytes(reversed(AES_KEY))
    )
    assert verifier.verify("bob", OTPS[0], CTX).result is Result.BAD_CODE
    # None of these failures moved alice's counter.
    assert verifier.verify("alice", OTPS[0], CTX).result is Result.ACCEPTED


def test_enroll_validation(mfa_env: MfaEnv) -> None:
    settings = mfa_env.initialise()
    manager = DeviceManager(mfa_env.open(settings))
    for public_id, private_id, key in (
        ("short", PRIVATE_ID, AES_KEY),
        ("abcdefghijkl", PRIVATE_ID, AES_KEY),  # 'a' is not modhex
        (PUBLIC_ID, PRIVATE_ID[:5], AES_KEY),
        (PUBLIC_ID, PRIVATE_ID, AES_KEY[:15]),
    ):
        with pytest.raises(InvalidInput):
            manager.enroll_yubico("alice", CTX, public_id=public_id, private_id=private_id, aes_key=key)
    assert manager.list_devices("alice") == []
