"""FIDO2 PINs: enrollment through ClientPin and the PAM FIDO step asking for the PIN, against the
software authenticator's real clientPin (ECDH key agreement, PIN/UV protocols 1 and 2, retries)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest
from fido2.ctap import CtapError
from fido2.ctap2.base import Ctap2
from fido2.ctap2.pin import ClientPin
from soft_authenticator import MAX_PIN_RETRIES, SoftAuthenticator

from devicedb.errors import InvalidInput
from devicedb.kinds import fido2_key
from devicedb.manage import DeviceManager
from devicedb.models import Context, Result
from devicedb.store import Store
from devicedb.verifier import Verifier

if TYPE_CHECKING:
    from conftest import MfaEnv

CTX = Context(service="sudo")
RP = "pam://testhost"
PIN = "s3cret-PIN"
WRONG = "wr0ng-PIN"
EASY = "lockout:\n  max_failures: 100\n  hard_lock_after: 100\n"
MC, GA = 0x01, 0x02
ERR = CtapError.ERR


def requests_of(key: SoftAuthenticator, command: int) -> list[dict[Any, Any]]:
    return [params for cmd, params in key.requests if cmd == command]


@pytest.fixture
def store(mfa_env: MfaEnv) -> Store:
    return mfa_env.open(mfa_env.initialise(EASY))


def enroll(store: Store, key: SoftAuthenticator, pin: str | None, uv: str = "required", user: str = "alice") -> Any:
    return DeviceManager(store).enroll_fido(user, key, CTX, rp_id=RP, uv=uv, pin=(lambda: pin))


# -- the software authenticator itself: it must refuse what a real key refuses --------------------


def test_soft_key_checks_pin_tokens_and_pin_uv_auth_params() -> None:
    key = SoftAuthenticator(pin=PIN)
    ctap = Ctap2(key)
    assert ctap.info.options["clientPin"] is True and "uv" not in ctap.info.options
    assert ctap.info.pin_uv_protocols == [2, 1]
    client_pin = ClientPin(ctap)
    cdh = bytes(range(32))
    user = {"id": b"alice", "name": "alice"}
    alg = [{"type": "public-key", "alg": -7}]

    def make(**kw: Any) -> Any:
        return ctap.make_credential(cdh, {"id": RP, "name": "x"}, user, alg, **kw)

    with pytest.raises(CtapError) as err:
        make()  # a PIN is set: makeCredential needs a pinUvAuthParam
    assert err.value.code == ERR.PUAT_REQUIRED
    with pytest.raises(CtapError) as err:
        make(options={"uv": True})  # no built-in UV to ask for
    assert err.value.code == ERR.INVALID_OPTION
    token = client_pin.get_pin_token(PIN, ClientPin.PERMISSION.MAKE_CREDENTIAL, RP)
    with pytest.raises(CtapError) as err:
        make(pin_uv_param=client_pin.protocol.authenticate(token, bytes(32)), pin_uv_protocol=2)  # other data
    assert err.value.code == ERR.PIN_AUTH_INVALID
    with pytest.raises(CtapError) as err:
        make(pin_uv_param=client_pin.protocol.authenticate(token, cdh), pin_uv_protocol=3)
    assert err.value.code == ERR.INVALID_PARAMETER
    response = make(pin_uv_param=client_pin.protocol.authenticate(token, cdh), pin_uv_protocol=2)
    assert response.auth_data.is_user_verified()
    with pytest.raises(CtapError) as err:  # the token's makeCredential permission is used up
        make(pin_uv_param=client_pin.protocol.authenticate(token, cdh), pin_uv_protocol=2)
    assert err.value.code == ERR.PIN_AUTH_INVALID
    cred = [{"type": "public-key", "id": response.auth_data.credential_data.credential_id}]
    mc_token = client_pin.get_pin_token(PIN, ClientPin.PERMISSION.MAKE_CREDENTIAL, RP)
    with pytest.raises(CtapError) as err:  # a makeCredential token does not sign in
        ctap.get_assertion(
            RP, cdh, cred, pin_uv_param=client_pin.protocol.authenticate(mc_token, cdh), pin_uv_protocol=2
        )
    assert err.value.code == ERR.PIN_AUTH_INVALID
    other_rp = client_pin.get_pin_token(PIN, ClientPin.PERMISSION.GET_ASSERTION, "pam://elsewhere")
    with pytest.raises(CtapError) as err:  # a token bound to another RP
        ctap.get_assertion(
            RP, cdh, cred, pin_uv_param=client_pin.protocol.authenticate(other_rp, cdh), pin_uv_protocol=2
        )
    assert err.value.code == ERR.PIN_AUTH_INVALID
    assert not ctap.get_assertion(RP, cdh, cred).auth_data.is_user_verified()  # a touch alone: no UV flag
    ga_token = client_pin.get_pin_token(PIN, ClientPin.PERMISSION.GET_ASSERTION, RP)
    signed = ctap.get_assertion(
        RP, cdh, cred, pin_uv_param=client_pin.protocol.authenticate(ga_token, cdh), pin_uv_protocol=2
    )
    assert signed.auth_data.is_user_verified() and signed.auth_data.is_user_present()


def test_soft_key_counts_wrong_pins_like_a_real_key() -> None:
    key = SoftAuthenticator(pin=PIN)
    client_pin = ClientPin(Ctap2(key))
    for expected in (ERR.PIN_INVALID, ERR.PIN_INVALID, ERR.PIN_AUTH_BLOCKED):
        with pytest.raises(CtapError) as err:
            client_pin.get_pin_token(WRONG, ClientPin.PERMISSION.GET_ASSERTION, RP)
        assert err.value.code == expected
    assert client_pin.get_pin_retries()[0] == MAX_PIN_RETRIES - 3
    with pytest.raises(CtapError) as err:  # blocked until a power cycle, even with the right PIN
        client_pin.get_pin_token(PIN, ClientPin.PERMISSION.GET_ASSERTION, RP)
    assert err.value.code == ERR.PIN_AUTH_BLOCKED
    key.power_cycle()
    client_pin.get_pin_token(PIN, ClientPin.PERMISSION.GET_ASSERTION, RP)
    assert client_pin.get_pin_retries()[0] == MAX_PIN_RETRIES  # a right PIN resets the count
    key.pin_retries = 1
    with pytest.raises(CtapError) as err:
        client_pin.get_pin_token(WRONG, ClientPin.PERMISSION.GET_ASSERTION, RP)
    assert err.value.code == ERR.PIN_BLOCKED
    key.power_cycle()
    with pytest.raises(CtapError) as err:
        client_pin.get_pin_token(PIN, ClientPin.PERMISSION.GET_ASSERTION, RP)
    assert err.value.code == ERR.PIN_BLOCKED
    unset = ClientPin(Ctap2(SoftAuthenticator(builtin_uv=False)))
    with pytest.raises(CtapError) as err:
        unset.get_pin_token(PIN, ClientPin.PERMISSION.GET_ASSERTION, RP)
    assert err.value.code == ERR.PIN_NOT_SET


# -- enrollment ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "protocol"),
    [({}, 2), ({"pin_protocols": (1,)}, 1), ({"token_permissions": False}, 2)],
    ids=["protocol-2", "protocol-1", "ctap-2.0-getPinToken"],
)
def test_enrollment_with_the_right_pin(store: Store, settings: dict[str, Any], protocol: int) -> None:
    key = SoftAuthenticator(pin=PIN, **settings)
    device = enroll(store, key, PIN)
    assert device.params["enrollment_uv"] == "pin" and device.params["user_verified"] is True
    assert device.params["uv"] == "required"
    (make,) = requests_of(key, 0x01)
    assert make[9] == protocol and len(make[8]) == (16 if protocol == 1 else 32)  # pinUvAuthParam sent
    assert "uv" not in (make.get(7) or {})  # the PIN token, not the uv option
    pin_commands = [p[2] for p in requests_of(key, 0x06)]
    assert (0x09 if settings.get("token_permissions", True) else 0x05) in pin_commands
    if settings.get("token_permissions", True):
        token_request = next(p for p in requests_of(key, 0x06) if p[2] == 0x09)
        assert token_request[9] == MC and token_request[10] == RP  # makeCredential only, for this RP
    row = next(r for r in store.audit_rows() if r.event == "device_added")
    assert row.detail["enrollment_uv"] == "pin"
    assert PIN not in repr([r.as_dict() for r in store.audit_rows()])


@pytest.mark.parametrize("uv", ["required", "discouraged"])
def test_a_key_with_a_pin_always_gets_it(store: Store, uv: str) -> None:
    key = SoftAuthenticator(pin=PIN)
    device = enroll(store, key, PIN, uv=uv)
    assert device.params["enrollment_uv"] == "pin"  # a key with a PIN refuses makeCredential without it


def test_a_wrong_pin_stores_nothing_and_reports_the_retries(store: Store) -> None:
    key = SoftAuthenticator(pin=PIN)
    with pytest.raises(fido2_key.PinRejected, match=f"{MAX_PIN_RETRIES - 1} PIN retries left") as err:
        enroll(store, key, "wrong-9")
    assert err.value.retries == MAX_PIN_RETRIES - 1 and key.pin_retries == MAX_PIN_RETRIES - 1
    assert "wrong-9" not in str(err.value)
    enroll_attempt = pytest.raises(fido2_key.PinRejected, match=f"{MAX_PIN_RETRIES - 2} PIN retries left")
    with enroll_attempt:
        enroll(store, key, "wrong-8")
    with pytest.raises(fido2_key.PinRejected, match="unplugged and plugged in again"):
        enroll(store, key, "wrong-7")
    assert not requests_of(key, 0x01)  # no makeCredential was sent
    assert store.list_devices("alice") == [] and key.credentials == {}
    assert not [r for r in store.audit_rows() if r.event == "device_added"]
    key.power_cycle()
    key.pin_retries = 1
    with pytest.raises(fido2_key.PinRejected, match="PIN is blocked"):
        enroll(store, key, "wrong-6")
    with pytest.raises(fido2_key.PinRejected, match="at least 4 characters"):
        enroll(store, SoftAuthenticator(pin=PIN), "12")
    assert store.list_devices("alice") == []


def test_no_pin_set_and_uv_required_is_refused(store: Store) -> None:
    key = SoftAuthenticator(builtin_uv=False)  # supports a PIN, none set, no built-in UV
    with pytest.raises(InvalidInput, match="set a PIN on the key first"):
        enroll(store, key, None)
    assert store.list_devices("alice") == [] and not requests_of(key, 0x01)
    device = enroll(store, key, None, uv="preferred")  # touch only: no PIN needed
    assert device.params["enrollment_uv"] == "none" and device.params["user_verified"] is False
    builtin = enroll(store, SoftAuthenticator(), None)  # built-in UV (no PIN): the uv option
    assert builtin.params["enrollment_uv"] == "built-in" and builtin.params["user_verified"] is True


def test_a_key_with_a_pin_and_no_pin_given_stores_nothing(store: Store) -> None:
    for answer in (None, ""):
        with pytest.raises(InvalidInput, match="no PIN was given"):
            enroll(store, SoftAuthenticator(pin=PIN), answer)
    with pytest.raises(InvalidInput, match="no PIN was given"):
        DeviceManager(store).enroll_fido("alice", SoftAuthenticator(pin=PIN), CTX, rp_id=RP)
    assert store.list_devices("alice") == []


def test_cli_enroll_fido_asks_the_pin_on_the_terminal(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import getpass

    from cli_helpers import make_config, run_cli

    from pam_module import fido

    config = make_config(tmp_path)
    key = SoftAuthenticator(pin=PIN)
    monkeypatch.setattr(fido, "attached_keys", lambda: [key])
    asked: list[str] = []
    answers = [WRONG, PIN]

    def fake_getpass(prompt: str = "") -> str:
        asked.append(prompt)
        return answers.pop(0)

    monkeypatch.setattr(getpass, "getpass", fake_getpass)
    rc, out, err = run_cli(config, "enroll", "fido", "alice", "--uv", "required", "--rp-id", RP)
    assert rc == 1 and "wrong PIN" in err and f"{MAX_PIN_RETRIES - 1} PIN retries left" in err
    assert "nothing was stored" in err and WRONG not in out + err
    assert asked == ["PIN of the security key: "] and "Touch your security key" not in out
    assert run_cli(config, "devices", "list", "alice")[1].startswith("no devices")
    rc, out, err = run_cli(config, "enroll", "fido", "alice", "--uv", "required", "--rp-id", RP)
    assert rc == 0, err
    assert "user verified at enrollment: the key's PIN" in out and PIN not in out + err
    rc, out, _ = run_cli(config, "audit", "export")
    assert rc == 0 and PIN not in out and WRONG not in out
    # --pin-stdin reads it from standard input instead (the terminal is not asked).
    rc, out, err = run_cli(config, "enroll", "fido", "bob", "--rp-id", RP, "--pin-stdin", stdin=f"{PIN}\n")
    assert rc == 0, err
    assert asked == ["PIN of the security key: "] * 2
    rc, _, err = run_cli(config, "enroll", "fido", "carol", "--uv", "required", "--rp-id", RP, "--pin-stdin")
    assert rc == 5 and "no PIN was given" in err
    monkeypatch.setattr(fido, "attached_keys", lambda: [SoftAuthenticator(builtin_uv=False)])
    rc, _, err = run_cli(config, "enroll", "fido", "carol", "--uv", "required", "--rp-id", RP)
    assert rc == 5 and "set a PIN on the key first" in err


# -- the PAM FIDO step ------------------------------------------------------------------------


@pytest.fixture
def pin_env(store: Store, mfa_env: MfaEnv) -> tuple[Store, Verifier, SoftAuthenticator]:
    key = SoftAuthenticator(pin=PIN)
    enroll(store, key, PIN)
    key.requests.clear()
    return store, mfa_env.verifier(store), key


def pam_step(verifier: Verifier, key: SoftAuthenticator, answers: list[Any]) -> tuple[Any, list[str]]:
    from pam_module import fido

    said: list[str] = []

    def ask_pin(prompt: str) -> Any:
        said.append(prompt)
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    return fido.authenticate_with_key(said.append, verifier, "alice", CTX, [key], ask_pin=ask_pin), said


def test_pam_step_asks_the_pin_and_signs_with_a_get_assertion_token(pin_env: Any) -> None:
    from pam_module import fido

    store, verifier, key = pin_env
    decision, said = pam_step(verifier, key, [PIN])
    assert decision is not None and decision.accepted
    assert said == [fido.PIN_PROMPT, fido.TOUCH_PROMPT]  # the PIN first, then the touch
    token_request = next(p for p in requests_of(key, 0x06) if p[2] == 0x09)
    assert token_request[9] == GA and token_request[10] == RP
    signed = [p for p in requests_of(key, 0x02) if (p.get(5) or {}).get("up", True)]
    assert len(signed) == 1 and signed[0][7] == 2 and len(signed[0][6]) == 32
    assert store.lock_state("alice").failures == 0
    assert store.audit_rows()[-1].reason == "accepted: fido2 key"


def test_pam_step_wrong_pin_is_a_failed_attempt(pin_env: Any) -> None:
    store, verifier, key = pin_env
    decision, said = pam_step(verifier, key, [WRONG])
    assert decision is not None and decision.result is Result.BAD_CODE
    assert said == ["PIN for your security key: "]  # no touch asked: nothing was signed
    assert not [p for p in requests_of(key, 0x02) if (p.get(5) or {}).get("up", True)]
    assert store.lock_state("alice").failures == 1 and key.pin_retries == MAX_PIN_RETRIES - 1
    reasons = [r.reason for r in store.audit_rows(user="alice")]
    assert f"fido2: wrong PIN ({MAX_PIN_RETRIES - 1} retries left on the key)" in reasons
    assert WRONG not in repr([r.as_dict() for r in store.audit_rows()])
    # A PIN-less assertion (uv required) is not a way around it: the core refuses the missing UV flag.
    rp_id, challenge, allow, needs_uv = verifier.fido_request("alice")
    assert needs_uv
    response = Ctap2(key).get_assertion(
        rp_id, fido2_key.client_data_hash(challenge, rp_id), [{"type": "public-key", "id": c} for c in allow]
    )
    unverified = fido2_key.Assertion(
        bytes(response.credential["id"]), bytes(response.auth_data), bytes(response.signature)
    )
    assert verifier.verify_fido("alice", unverified, rp_id, challenge, CTX).result is Result.BAD_CODE
    decision, _ = pam_step(verifier, key, [PIN])
    assert decision is not None and decision.accepted  # the right PIN still works, and resets the key's count
    assert key.pin_retries == MAX_PIN_RETRIES


@pytest.mark.parametrize("answer", ["", "   ", None, RuntimeError("conversation failed")])
def test_pam_step_empty_or_aborted_pin_ends_without_a_code(pin_env: Any, answer: Any) -> None:
    store, verifier, key = pin_env
    decision, _ = pam_step(verifier, key, [answer])
    assert decision is not None and decision.result is Result.ERROR
    assert store.lock_state("alice").failures == 0 and key.pin_retries == MAX_PIN_RETRIES  # nothing sent
    assert "fido2 PIN" in (store.audit_rows()[-1].reason or "")


def test_pam_step_locked_user_is_asked_the_same(pin_env: Any, mfa_env: MfaEnv) -> None:
    from pam_module import fido

    store, verifier, key = pin_env
    for _ in range(100):  # EASY locks at 100 failures
        verifier.record_fido_failure("alice", CTX, "wrong PIN (test)")
    assert store.lock_state("alice").locked_at(mfa_env.clock())
    for answer in (PIN, WRONG):
        decision, said = pam_step(verifier, key, [answer])
        assert decision is not None and decision.result is Result.LOCKED
        assert said[0] == fido.PIN_PROMPT  # the same PIN prompt as for an unlocked account


def test_pam_step_skips_the_pin_where_uv_is_not_required(store: Store, mfa_env: MfaEnv) -> None:
    from pam_module import fido

    key = SoftAuthenticator(pin=PIN)
    enroll(store, key, PIN, uv="preferred")
    decision, said = pam_step(mfa_env.verifier(store), key, [])
    assert decision is not None and decision.accepted and said == [fido.TOUCH_PROMPT]
    assert not [p for p in requests_of(key, 0x02) if 6 in p]  # no pinUvAuthParam at login


def test_pam_step_does_not_ask_for_a_key_without_the_credential(pin_env: Any) -> None:
    _, verifier, _ = pin_env
    stranger = SoftAuthenticator(pin="other-PIN")
    decision, said = pam_step(verifier, stranger, [])
    assert decision is None and said == []  # the silent probe found no credential: no PIN spent on it
    assert stranger.pin_retries == MAX_PIN_RETRIES


def test_adapter_pin_prompt_is_echo_off_then_touch(
    pin_env: Any, mfa_env: MfaEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pam_handle import FakePamHandle

    from devicedb.models import PUBLIC_FAILURE_MESSAGE
    from pam_module import adapter, fido

    store, _, key = pin_env
    config = mfa_env.root / "mfaguard.yaml"
    config.write_text(mfa_env.yaml(EASY) + f"logging:\n  file: {mfa_env.root}/pam.log\n")
    config.chmod(0o600)
    monkeypatch.setattr(fido, "attached_keys", lambda: [key])
    argv = ["pam_mfaguard.py", f"config={config}"]

    class Recording(FakePamHandle):
        styles: list[int]

        def conversation(self, message: Any) -> Any:
            self.styles = [*getattr(self, "styles", []), message.msg_style]
            return super().conversation(message)

    handle = Recording("alice", {}, [PIN])
    assert adapter.authenticate(handle, 0, argv) == handle.PAM_SUCCESS
    assert handle.prompts == [fido.PIN_PROMPT, fido.TOUCH_PROMPT]
    assert handle.styles == [handle.PAM_PROMPT_ECHO_OFF, handle.PAM_TEXT_INFO]
    # A wrong PIN: one failure, then the code prompts as after any failed key (alice has only the key).
    handle = Recording("alice", {}, [WRONG, "123456", "123456", "123456"])
    assert adapter.authenticate(handle, 0, argv) == handle.PAM_AUTH_ERR
    assert handle.prompts[:2] == [fido.PIN_PROMPT, PUBLIC_FAILURE_MESSAGE]
    assert handle.prompts.count(adapter.DEFAULT_PROMPT) == 3
    assert store.lock_state("alice").failures == 1  # the PIN; codes reach no device of hers
    # An empty PIN answer ends the login: no touch, no code prompt.
    handle = Recording("alice", {}, [""])
    assert adapter.authenticate(handle, 0, argv) == handle.PAM_AUTH_ERR
    assert handle.prompts == [fido.PIN_PROMPT, PUBLIC_FAILURE_MESSAGE]
    log_text = (mfa_env.root / "pam.log").read_text()
    assert PIN not in log_text and WRONG not in log_text


class FailingClientPin(SoftAuthenticator):
    """A key whose clientPin command fails (CTAP2_ERR_OTHER), as a flaky or half-unplugged key might."""

    def call(self, cmd: int, data: bytes = b"", event: Any = None, on_keepalive: Any = None) -> bytes:
        if data[:1] == b"\x06":
            return bytes([0x7F])
        return super().call(cmd, data, event, on_keepalive)


class U2fOnly(SoftAuthenticator):
    """Claims no CBOR (so it is asked through U2F), and answers no U2F message either: a broken key."""

    @property
    def capabilities(self) -> int:
        return 0


def test_a_key_failing_mid_enrollment_stores_nothing(store: Store) -> None:
    with pytest.raises(InvalidInput, match="failed during the PIN exchange"):
        enroll(store, FailingClientPin(pin=PIN), PIN)
    with pytest.raises(InvalidInput, match="answers neither CTAP2 nor U2F"):
        enroll(store, U2fOnly(), None)
    assert store.list_devices("alice") == []


def test_a_key_failing_mid_pin_exchange_at_login_falls_back_to_the_code(pin_env: Any) -> None:
    store, verifier, key = pin_env
    flaky = FailingClientPin(pin=PIN)
    flaky.credentials = key.credentials  # the same credential, on a key whose clientPin fails
    decision, said = pam_step(verifier, flaky, [PIN])
    assert decision is None  # not accepted: the caller goes on to the code prompt (or fails)
    assert said == ["PIN for your security key: "] and store.lock_state("alice").failures == 0
    assert pam_step(verifier, U2fOnly(), [])[0] is None
