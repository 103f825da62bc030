"""Local FIDO2 keys through fido2's real CTAP2 client code, against a software authenticator."""

from __future__ import annotations

import traceback
from typing import TYPE_CHECKING, Any

import pytest
from fido2.ctap2.base import Ctap2
from soft_authenticator import SoftAuthenticator

from devicedb.kinds import fido2_key
from devicedb.manage import DeviceManager
from devicedb.models import Context, Result
from devicedb.settings import parse_settings
from devicedb.store import Store
from devicedb.verifier import Verifier

if TYPE_CHECKING:
    from conftest import MfaEnv

CTX = Context(service="sudo")
RP = "pam://testhost"
EASY = "lockout:\n  max_failures: 100\n  hard_lock_after: 100\n"


def assertion_from(key: SoftAuthenticator, rp_id: str, challenge: bytes, allow: list[bytes]) -> fido2_key.Assertion:
    response = Ctap2(key).get_assertion(
        rp_id, fido2_key.client_data_hash(challenge, rp_id), [{"type": "public-key", "id": c} for c in allow]
    )
    return fido2_key.Assertion(bytes(response.credential["id"]), bytes(response.auth_data), bytes(response.signature))


def login(verifier: Verifier, key: SoftAuthenticator, user: str = "alice") -> Result:
    request = verifier.fido_request(user)
    assert request is not None
    rp_id, challenge, allow, _ = request
    return verifier.verify_fido(user, assertion_from(key, rp_id, challenge, allow), rp_id, challenge, CTX).result


@pytest.fixture
def env(mfa_env: MfaEnv) -> tuple[Store, Verifier, SoftAuthenticator]:
    store = mfa_env.open(mfa_env.initialise(EASY))
    key = SoftAuthenticator()
    device = DeviceManager(store).enroll_fido("alice", key, CTX, rp_id=RP, label="yubikey")
    assert device.kind == "fido2" and device.params["rp_id"] == RP
    assert device.params["aaguid"] == "6d66616775617264736f66746b657931"
    return store, mfa_env.verifier(store), key


def first_count(assertion: fido2_key.Assertion) -> int:
    return int.from_bytes(assertion.auth_data[33:37], "big")


def stored_count(store: Store, user: str = "alice") -> int | None:
    return next(d for d in store.list_devices(user) if d.kind == "fido2").sign_count


def set_stored(mfa_env: MfaEnv, value: int) -> None:
    with mfa_env.raw() as raw:
        raw.execute("UPDATE devices SET sign_count = ? WHERE kind = 'fido2'", (value,))


def test_enrolled_key_logs_in_and_its_counter_moves(env: Any) -> None:
    store, verifier, key = env
    assert login(verifier, key) is Result.ACCEPTED
    assert stored_count(store) == 1
    assert login(verifier, key) is Result.ACCEPTED
    assert stored_count(store) == 2
    assert store.audit_rows()[-1].reason == "accepted: fido2 key"


def test_sign_counter_rule(env: Any, mfa_env: MfaEnv) -> None:
    store, verifier, key = env
    set_stored(mfa_env, 10)
    for presented in (9, 10):
        key.sign_count = presented - 1  # the key adds one before it signs
        assert login(verifier, key) is Result.BAD_CODE
        assert any(r.reason == "fido2: possible clone" for r in store.audit_rows())
        assert stored_count(store) == 10
    key.sign_count = 10
    assert login(verifier, key) is Result.ACCEPTED
    assert stored_count(store) == 11
    set_stored(mfa_env, 5)
    key.sign_count, key.count_step = 0, 0  # presents 0 against a stored 5
    assert login(verifier, key) is Result.BAD_CODE
    set_stored(mfa_env, 0)
    assert login(verifier, key) is Result.ACCEPTED  # 0 and 0: a key that keeps no counter


def test_flags(env: Any, mfa_env: MfaEnv) -> None:
    store, verifier, key = env
    key.user_present = False  # flags 0x00
    assert login(verifier, key) is Result.BAD_CODE
    key.user_present, key.user_verified = True, False  # touch only: flags 0x01
    assert login(verifier, key) is Result.ACCEPTED  # uv "preferred"
    with mfa_env.raw() as raw:
        raw.execute("UPDATE devices SET params = json_set(params, '$.uv', 'required') WHERE kind = 'fido2'")
    assert login(verifier, key) is Result.BAD_CODE
    key.user_verified = True
    assert login(verifier, key) is Result.ACCEPTED


def test_foreign_credential_other_rp_and_stale_challenge_are_rejected(env: Any) -> None:
    store, verifier, key = env
    bobs_key = SoftAuthenticator()
    DeviceManager(store).enroll_fido("bob", bobs_key, CTX, rp_id=RP)
    rp_id, challenge, _, _ = verifier.fido_request("alice")
    bob_rp, bob_challenge, bob_allow, _ = verifier.fido_request("bob")
    bobs = assertion_from(bobs_key, bob_rp, challenge, bob_allow)
    assert verifier.verify_fido("alice", bobs, rp_id, challenge, CTX).result is Result.BAD_CODE
    allow = [fido2_key.credential_id(d) for d in store.list_devices("alice")]
    key.credentials[allow[0]] = ("pam://elsewhere", key.credentials[allow[0]][1])
    other_rp = assertion_from(key, "pam://elsewhere", challenge, allow)
    assert verifier.verify_fido("alice", other_rp, rp_id, challenge, CTX).result is Result.BAD_CODE
    key.credentials[allow[0]] = (RP, key.credentials[allow[0]][1])
    old = assertion_from(key, rp_id, challenge, allow)
    _, fresh_challenge, _, _ = verifier.fido_request("alice")
    assert verifier.verify_fido("alice", old, rp_id, fresh_challenge, CTX).result is Result.BAD_CODE
    reasons = [r.reason for r in store.audit_rows(user="alice")]
    assert "fido2: not a credential of this user" in reasons
    assert "fido2: RP id hash does not match" in reasons
    assert "fido2: signature does not verify" in reasons


def _race_worker(barrier: Any, queue: Any, index: int, yaml_text: str, user: str, parts: tuple[Any, ...]) -> None:
    try:
        settings = parse_settings(yaml_text)
        with Store.open(settings) as store:
            verifier = Verifier(settings, store=store)
            assertion, rp_id, challenge = parts
            barrier.wait(timeout=60)
            queue.put((index, True, verifier.verify_fido(user, assertion, rp_id, challenge, CTX).result.value))
    except BaseException:
        queue.put((index, False, traceback.format_exc()))


@pytest.mark.slow
def test_two_concurrent_assertions_with_the_same_count_give_one_success(env: Any, mfa_env: MfaEnv, lib: Any) -> None:
    store, verifier, key = env
    rp_id, challenge, allow, _ = verifier.fido_request("alice")
    first = assertion_from(key, rp_id, challenge, allow)
    key.sign_count -= 1  # the same count again, signed afresh
    second = assertion_from(key, rp_id, challenge, allow)
    results = lib.run_processes(
        _race_worker,
        [
            (mfa_env.yaml(EASY), "alice", (first, rp_id, challenge)),
            (mfa_env.yaml(EASY), "alice", (second, rp_id, challenge)),
        ],
    )
    # Exactly one success; the loser presents a count already used, which the counter rule refuses.
    assert sorted(results) == ["accepted", "bad_code"]
    assert stored_count(store) == first_count(first)


def test_pam_path_uses_an_attached_key_and_falls_back_without_one(env: Any) -> None:
    """The PAM module's FIDO2 step, with fido2's client code talking to the software key."""
    from pam_module import fido

    store, verifier, key = env
    said: list[str] = []
    decision = fido.authenticate_with_key(said.append, verifier, "alice", CTX, [key])
    assert decision is not None and decision.accepted
    assert said == [fido.TOUCH_PROMPT]
    assert fido.authenticate_with_key(said.append, verifier, "alice", CTX, []) is None  # no key: code prompt
    assert fido.authenticate_with_key(said.append, verifier, "alice", CTX, [SoftAuthenticator()]) is None
    assert fido.authenticate_with_key(said.append, verifier, "nobody", CTX, [key]) is None  # no FIDO2 device
    assert verifier.has_fido_key("alice") and not verifier.has_fido_key("nobody")


def test_adapter_offers_the_key_before_the_code(env: Any, mfa_env: MfaEnv, monkeypatch: pytest.MonkeyPatch) -> None:
    """pam_module.adapter with a stand-in pam handle: the touch prompt, then PAM_SUCCESS without a code.
    The key list is the software authenticator, since no USB key can be attached here."""
    from pam_handle import FakePamHandle

    from pam_module import adapter, fido

    store, _, key = env
    config = mfa_env.root / "mfaguard.yaml"
    config.write_text(mfa_env.yaml(EASY) + f"logging:\n  file: {mfa_env.root}/pam.log\n")
    config.chmod(0o600)
    monkeypatch.setattr(fido, "attached_keys", lambda: [key])
    handle = FakePamHandle("alice", {}, [])
    assert adapter.authenticate(handle, 0, ["pam_mfaguard.py", f"config={config}"]) == handle.PAM_SUCCESS
    assert handle.prompts == [fido.TOUCH_PROMPT]
    monkeypatch.setattr(fido, "attached_keys", lambda: [])
    handle = FakePamHandle("alice", {}, ["123456"] * 3)
    assert adapter.authenticate(handle, 0, ["pam_mfaguard.py", f"config={config}"]) == handle.PAM_AUTH_ERR
    assert handle.prompts.count(adapter.DEFAULT_PROMPT) == 3  # no key: the code prompt


def test_cli_enroll_fido_without_a_key_says_what_to_do(tmp_path: Any) -> None:
    from cli_helpers import make_config, run_cli

    config = make_config(tmp_path)
    rc, _, err = run_cli(config, "enroll", "fido", "alice")
    assert rc == 5 and "no FIDO2 key found" in err and "plug one in" in err
    rc, _, err = run_cli(config, "enroll", "fido", "alice", "--uv", "sometimes")
    assert rc == 2


def test_a_service_can_require_a_fido2_key(mfa_env: MfaEnv, monkeypatch: pytest.MonkeyPatch) -> None:
    from pam_handle import FakePamHandle

    from devicedb.kinds import totp
    from devicedb.models import FIDO_REQUIRED
    from pam_module import adapter, fido

    extra = EASY + "fido:\n  rp_id: pam://shared.example\n  required_for_services: [sudo]\n"
    store = mfa_env.open(mfa_env.initialise(extra))
    verifier = mfa_env.verifier(store)
    key = SoftAuthenticator()
    device = DeviceManager(store).enroll_fido("alice", key, CTX)
    assert device.params["rp_id"] == "pam://shared.example"  # fido.rp_id is the default RP id
    secret = bytes(range(20))
    DeviceManager(store).enroll_totp("alice", CTX, secret=secret, pending=False)
    code = totp.code_at(secret, 6, "sha1", 30, mfa_env.clock())
    refused = verifier.verify("alice", code, Context(service="sudo"))
    assert refused.result is Result.NO_USABLE_DEVICE and refused.reason == FIDO_REQUIRED
    assert store.lock_state("alice").failures == 0
    assert verifier.verify("alice", code, Context(service="sshd")).accepted  # other services take codes
    assert login(verifier, key) is Result.ACCEPTED  # the key itself is accepted at sudo
    config = mfa_env.root / "mfaguard.yaml"
    config.write_text(mfa_env.yaml(extra) + f"logging:\n  file: {mfa_env.root}/pam.log\n")
    config.chmod(0o600)
    monkeypatch.setattr(fido, "attached_keys", lambda: [])
    handle = FakePamHandle("alice", {}, ["123456"] * 3)
    handle.service = "sudo"
    assert adapter.authenticate(handle, 0, ["pam_mfaguard.py", f"config={config}"]) == handle.PAM_AUTH_ERR
    assert adapter.DEFAULT_PROMPT not in handle.prompts  # no code is asked where none would count


def test_a_user_with_only_security_keys_is_told_codes_cannot_work(env: Any) -> None:
    from devicedb.models import ONLY_SECURITY_KEYS

    store, verifier, _ = env
    decision = verifier.verify("alice", "123456", CTX)
    assert decision.result is Result.NO_USABLE_DEVICE and decision.reason == ONLY_SECURITY_KEYS
    assert store.lock_state("alice").failures == 0
