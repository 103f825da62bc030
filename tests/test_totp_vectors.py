"""RFC 6238 Appendix B test vectors, through code_at and through the Verifier."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from devicedb.kinds import is_digit_code, totp
from devicedb.models import Context, Result

if TYPE_CHECKING:
    from conftest import Enroll, Lib, MfaEnv

CTX = Context(service="test")
# RFC 6238 Appendix B seeds: ASCII "1234567890" repeated to 20, 32 and 64 bytes.
RFC_SEEDS = {
    "sha1": b"12345678901234567890",
    "sha256": b"12345678901234567890123456789012",
    "sha512": b"1234567890123456789012345678901234567890123456789012345678901234",
}

# RFC 6238 Appendix B: time -> 8-digit code per algorithm, period 30.
RFC6238_APPENDIX_B = {
    59: {"sha1": "94287082", "sha256": "46119246", "sha512": "90693936"},
    1111111109: {"sha1": "07081804", "sha256": "68084774", "sha512": "25091201"},
    1111111111: {"sha1": "14050471", "sha256": "67062674", "sha512": "99943326"},
    1234567890: {"sha1": "89005924", "sha256": "91819424", "sha512": "93441116"},
    2000000000: {"sha1": "69279037", "sha256": "90698825", "sha512": "38618901"},
    20000000000: {"sha1": "65353130", "sha256": "77737706", "sha512": "47863826"},
}
VECTORS = [
    pytest.param(t, algorithm, code, id=f"{algorithm}-{t}")
    for t, codes in RFC6238_APPENDIX_B.items()
    for algorithm, code in codes.items()
]


def test_all_eighteen_vectors_are_listed() -> None:
    assert len(VECTORS) == 18
    assert set(RFC6238_APPENDIX_B) == {59, 1111111109, 1111111111, 1234567890, 2000000000, 20000000000}


@pytest.mark.parametrize(("t", "algorithm", "expected"), VECTORS)
def test_code_at_matches_rfc6238(lib: type[Lib], t: int, algorithm: str, expected: str) -> None:
    assert totp.code_at(RFC_SEEDS[algorithm], 8, algorithm, 30, t) == expected
    # The independent reference in conftest agrees, so the other tests can trust it.
    assert lib.code(RFC_SEEDS[algorithm], t, digits=8, algorithm=algorithm) == expected
    assert lib.RFC_SEEDS == RFC_SEEDS


@pytest.mark.parametrize(("t", "algorithm", "expected"), VECTORS)
def test_verifier_accepts_rfc6238_vector(
    mfa_env: MfaEnv, enroll: Enroll, t: int, algorithm: str, expected: str
) -> None:
    mfa_env.clock.set(t)
    store = mfa_env.open(mfa_env.initialise())
    enrollment = enroll(store, "alice", RFC_SEEDS[algorithm], digits=8, algorithm=algorithm, period=30)
    verifier = mfa_env.verifier(store)

    decision = verifier.verify("alice", expected, CTX)

    assert decision.result is Result.ACCEPTED, decision
    assert decision.device_id == enrollment.device.id
    assert decision.user == "alice"
    (device,) = store.list_devices("alice")
    assert device.last_step == t // 30


@pytest.mark.parametrize(("t", "algorithm", "expected"), VECTORS)
def test_verifier_rejects_another_algorithms_code(
    mfa_env: MfaEnv, enroll: Enroll, t: int, algorithm: str, expected: str
) -> None:
    """The device's own algorithm is used: the same time's code under another HMAC is wrong."""
    mfa_env.clock.set(t)
    store = mfa_env.open(mfa_env.initialise())
    enroll(store, "alice", RFC_SEEDS[algorithm], digits=8, algorithm=algorithm, period=30)
    verifier = mfa_env.verifier(store)
    others = [codes for other, codes in RFC6238_APPENDIX_B[t].items() if other != algorithm]
    for other_code in others:
        assert other_code != expected
        assert verifier.verify("alice", other_code, CTX).result is Result.BAD_CODE
    assert verifier.verify("alice", expected, CTX).result is Result.ACCEPTED


RIGHT = "07081804"  # SHA1, t = 1111111109
LOOKALIKES = [
    pytest.param("7081804", id="leading-zero-dropped"),
    pytest.param("+7081804", id="plus-sign"),
    pytest.param(" 07081804", id="leading-space"),
    pytest.param("07081804 ", id="trailing-space"),
    pytest.param("07081804\n", id="trailing-newline"),
    pytest.param("\uff10\uff17\uff10\uff18\uff11\uff18\uff10\uff14", id="fullwidth-digits"),
    pytest.param("\u0660\u0667\u0660\u0668\u0661\u0668\u0660\u0664", id="arabic-indic-digits"),
    pytest.param("\u06f0\u06f7\u06f0\u06f8\u06f1\u06f8\u06f0\u06f4", id="extended-arabic-indic-digits"),
    pytest.param("\u0966\u096d\u0966\u096e\u0967\u096e\u0966\u096a", id="devanagari-digits"),
    pytest.param("0708 1804", id="inner-space"),
    pytest.param("0708-1804", id="inner-dash"),
    pytest.param("007081804", id="extra-leading-zero"),
    pytest.param("", id="empty"),
]


@pytest.mark.parametrize("response", LOOKALIKES)
def test_lookalikes_of_the_right_code_are_rejected(mfa_env: MfaEnv, enroll: Enroll, response: str) -> None:
    """Only the exact ASCII digit string of the configured length counts."""
    mfa_env.clock.set(1111111109)
    store = mfa_env.open(mfa_env.initialise())
    enroll(store, "alice", RFC_SEEDS["sha1"], digits=8, algorithm="sha1", period=30)
    verifier = mfa_env.verifier(store)
    if response and not response.isascii() and response.isdigit():
        # A trap worth checking: Python itself reads these as the right number.
        assert int(response) == int(RIGHT)

    decision = verifier.verify("alice", response, CTX)

    assert decision.result is Result.BAD_CODE, decision
    assert not decision.accepted
    assert store.lock_state("alice").failures == 1
    (device,) = store.list_devices("alice")
    assert device.last_step is None  # the look-alike consumed nothing
    # Tried last, the right code still works: the device and the time were right.
    assert verifier.verify("alice", RIGHT, CTX).result is Result.ACCEPTED


def test_bytes_responses(mfa_env: MfaEnv, enroll: Enroll) -> None:
    mfa_env.clock.set(1111111109)
    store = mfa_env.open(mfa_env.initialise())
    enroll(store, "alice", RFC_SEEDS["sha1"], digits=8, algorithm="sha1", period=30)
    verifier = mfa_env.verifier(store)
    assert verifier.verify("alice", b"\xff0708180", CTX).result is Result.BAD_CODE  # invalid UTF-8
    assert verifier.verify("alice", RIGHT.encode(), CTX).result is Result.ACCEPTED


def test_six_digit_device_uses_the_last_six_digits(mfa_env: MfaEnv, enroll: Enroll) -> None:
    """RFC 4226 truncation: the 6-digit code is the 8-digit one modulo 10**6."""
    mfa_env.clock.set(1111111109)
    store = mfa_env.open(mfa_env.initialise())
    enroll(store, "alice", RFC_SEEDS["sha1"], digits=6, algorithm="sha1", period=30)
    verifier = mfa_env.verifier(store)
    assert verifier.verify("alice", RIGHT, CTX).result is Result.BAD_CODE  # 8 digits on a 6-digit device
    assert verifier.verify("alice", RIGHT[-6:], CTX).result is Result.ACCEPTED


def test_is_digit_code() -> None:
    assert is_digit_code("07081804", 8)
    assert not is_digit_code("0708180", 8)
    assert not is_digit_code("\uff10" * 8, 8)
    assert not is_digit_code("\u0660" * 8, 8)
    assert not is_digit_code("+0708180", 8)


def test_a_sixty_second_device_uses_its_own_period(mfa_env: MfaEnv, enroll: Enroll, lib: type[Lib]) -> None:
    t = 1111111109
    mfa_env.clock.set(t)
    store = mfa_env.open(mfa_env.initialise("totp:\n  window: 0\n"))
    enroll(store, "alice", RFC_SEEDS["sha1"], digits=8, algorithm="sha1", period=60)
    verifier = mfa_env.verifier(store)
    thirty = RFC6238_APPENDIX_B[t]["sha1"]
    sixty = lib.code(RFC_SEEDS["sha1"], t, digits=8, period=60)
    assert sixty == totp.code_at(RFC_SEEDS["sha1"], 8, "sha1", 60, t)
    assert sixty != thirty
    assert verifier.verify("alice", thirty, CTX).result is Result.BAD_CODE
    assert verifier.verify("alice", sixty, CTX).result is Result.ACCEPTED
    (device,) = store.list_devices("alice")
    assert device.last_step == t // 60
