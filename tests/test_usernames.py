"""One user name: the canonical form used by PAM, RADIUS, lockout and audit."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from devicedb.errors import InvalidUserName
from devicedb.models import Context, Result
from devicedb.settings import UsernameSettings
from devicedb.usernames import canonical_user

if TYPE_CHECKING:
    from conftest import Enroll, Lib, MfaEnv

CTX = Context(service="test")

CORP = UsernameSettings(strip_realms=("CORP",))
CORP_FOLD = UsernameSettings(strip_realms=("CORP", "example.org"), case_fold=True)
PLAIN = UsernameSettings()
FOLD = UsernameSettings(case_fold=True)


@pytest.mark.parametrize(
    ("raw", "rules", "expected"),
    [
        ("alice", PLAIN, "alice"),
        ("alice@CORP", CORP, "alice"),
        ("CORP\\alice", CORP, "alice"),
        ("alice@corp", CORP, "alice"),  # realms compare case-insensitively
        ("corp\\alice", CORP, "alice"),
        ("alice@Corp", CORP, "alice"),
        ("alice@OTHER", CORP, "alice@OTHER"),  # an unlisted realm is kept
        ("OTHER\\alice", CORP, "OTHER\\alice"),
        ("alice@CORP", PLAIN, "alice@CORP"),  # no realm stripped unless configured
        ("CORP\\alice", PLAIN, "CORP\\alice"),
        ("alice@other@CORP", CORP, "alice@other"),  # the last @ separates the realm
        ("CORP\\alice\\x", CORP, "alice\\x"),  # the first backslash separates the realm
        ("Alice", PLAIN, "Alice"),  # no folding unless configured
        ("Alice", FOLD, "alice"),
        ("ALICE@CORP", CORP_FOLD, "alice"),
        ("CORP\\ALICE", CORP_FOLD, "alice"),
        ("Alice@EXAMPLE.ORG", CORP_FOLD, "alice"),
        ("Alice@OTHER", CORP_FOLD, "alice@other"),
        (b"alice", PLAIN, "alice"),
        ("j\u00f6rg".encode(), PLAIN, "j\u00f6rg"),
        ("alice smith", PLAIN, "alice smith"),  # inner spaces are not control characters
    ],
)
def test_canonical_names(raw: str | bytes, rules: UsernameSettings, expected: str) -> None:
    assert canonical_user(raw, rules) == expected


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param("ali\x00ce", id="nul"),
        pytest.param("alice\n", id="newline"),
        pytest.param("ali\nce", id="inner-newline"),
        pytest.param("ali\x7fce", id="del"),
        pytest.param("ali\u200bce", id="zero-width-space"),
        pytest.param("ali\u202ece", id="rtl-override"),
        pytest.param("ali\x1bce", id="escape"),
        pytest.param("ali\x85ce", id="c1-nel"),
        pytest.param("ali\u2028ce", id="line-separator"),
        pytest.param("ali\ufeffce", id="bom"),
        pytest.param("ali\ud800ce", id="lone-surrogate"),
        pytest.param("", id="empty"),
        pytest.param(b"", id="empty-bytes"),
        pytest.param(" alice", id="leading-space"),
        pytest.param("alice ", id="trailing-space"),
        pytest.param("\talice", id="leading-tab"),
        pytest.param("alice\u00a0", id="trailing-nbsp"),
        pytest.param(b"ali\xffce", id="invalid-utf8"),
        pytest.param(b"\xc3\x28", id="invalid-utf8-sequence"),
        pytest.param(b"\xed\xa0\x80", id="utf8-encoded-surrogate"),
        pytest.param("a" * 257, id="too-long"),
    ],
)
def test_refused_names(raw: str | bytes) -> None:
    for rules in (PLAIN, CORP_FOLD):
        with pytest.raises(InvalidUserName):
            canonical_user(raw, rules)


@pytest.mark.parametrize("raw", ["alice@CORP\x00", "CORP\\", "@CORP", "CORP\\ alice", "alice @CORP"])
def test_what_is_left_after_stripping_a_realm_is_checked_too(raw: str) -> None:
    with pytest.raises(InvalidUserName):
        canonical_user(raw, CORP)


def test_not_a_string_is_refused() -> None:
    with pytest.raises(InvalidUserName):
        canonical_user(42, PLAIN)  # type: ignore[arg-type]


def test_longest_allowed_name() -> None:
    assert canonical_user("a" * 256, PLAIN) == "a" * 256


def test_realm_forms_share_one_lockout_counter(lib: type[Lib], mfa_env: MfaEnv, enroll: Enroll) -> None:
    store = mfa_env.open(
        mfa_env.initialise(
            "usernames:\n  strip_realms: [CORP]\n  case_fold: true\n"
            "lockout:\n  max_failures: 3\n  lock_seconds: 300\n  hard_lock_after: 10\n"
        )
    )
    secret = lib.secret_for(1)
    enroll(store, "alice", secret)
    verifier = mfa_env.verifier(store)
    bad = lib.wrong_code(secret, mfa_env.clock())

    first = verifier.verify("alice@CORP", bad, Context(service="radius"))
    second = verifier.verify("CORP\\alice", bad, Context(service="sshd"))

    assert first.result is second.result is Result.BAD_CODE
    assert first.user == second.user == "alice"
    state = store.lock_state("alice")
    assert (state.failures, state.consecutive_failures) == (2, 2)
    assert store.lock_state("alice@CORP").failures == 0  # no second counter under the raw name
    # The third failure, under yet another spelling, locks alice everywhere.
    assert verifier.verify("ALICE@corp", bad, CTX).result is Result.BAD_CODE
    assert verifier.verify("alice", lib.code(secret, mfa_env.clock()), CTX).result is Result.LOCKED
    assert {r.user for r in store.audit_rows() if r.event in ("auth", "lock")} == {"alice"}


def test_an_unlisted_realm_is_another_user(lib: type[Lib], mfa_env: MfaEnv, enroll: Enroll) -> None:
    store = mfa_env.open(mfa_env.initialise("usernames:\n  strip_realms: [CORP]\n"))
    secret = lib.secret_for(1)
    enroll(store, "alice", secret)
    verifier = mfa_env.verifier(store)
    code = lib.code(secret, mfa_env.clock())
    decision = verifier.verify("alice@OTHER", code, CTX)
    assert decision.result is Result.NO_DEVICE
    assert decision.user == "alice@OTHER"
    assert verifier.verify("CORP\\alice", code, CTX).result is Result.ACCEPTED


def test_enrollment_uses_the_canonical_name(lib: type[Lib], mfa_env: MfaEnv, enroll: Enroll) -> None:
    store = mfa_env.open(mfa_env.initialise("usernames:\n  strip_realms: [CORP]\n  case_fold: true\n"))
    enrollment = enroll(store, "CORP\\Alice", lib.secret_for(1))
    assert enrollment.device.user == "alice"
    assert [d.user for d in store.list_devices()] == ["alice"]
    with pytest.raises(InvalidUserName):
        enroll(store, "bad\nname", lib.secret_for(2))


def test_a_refused_name_is_an_error_and_counts_nothing(lib: type[Lib], mfa_env: MfaEnv, enroll: Enroll) -> None:
    store = mfa_env.open(mfa_env.initialise())
    enroll(store, "alice", lib.secret_for(1))
    verifier = mfa_env.verifier(store)
    code = lib.code(lib.secret_for(1), mfa_env.clock())
    for raw in ("alice\x00", b"alic\xffe", "alice\n", " alice", "ali\u202ece"):
        decision = verifier.verify(raw, code, CTX)
        assert decision.result is Result.ERROR
        assert not decision.accepted
    assert store.lock_state("alice").failures == 0
    assert store.list_devices("alice")[0].last_step is None


NAMES = [
    "alice",
    "Alice",
    "alice@CORP",
    "CORP\\alice",
    "alice@OTHER",
    "OTHER\\alice",
    "alice@other@CORP",
    "CORP\\alice\\x",
    "j\u00f6rg@corp",
]


@pytest.mark.parametrize("rules", [PLAIN, CORP, FOLD, CORP_FOLD], ids=["plain", "corp", "fold", "corp-fold"])
def test_the_mapping_is_idempotent(rules: UsernameSettings) -> None:
    """A canonical name maps to itself, so re-canonicalising (as later phases do) changes nothing."""
    for raw in NAMES:
        once = canonical_user(raw, rules)
        assert canonical_user(once, rules) == once, raw


@pytest.mark.parametrize("raw", ["alice@CORP@CORP", "CORP\\CORP\\alice", "CORP\\alice@CORP", "corp\\alice@Corp"])
def test_a_second_configured_realm_is_refused(raw: str) -> None:
    with pytest.raises(InvalidUserName):
        canonical_user(raw, CORP)
