"""Keys that speak only CTAP1/U2F: enrollment and the PAM FIDO step through fido2's own Ctap1,
against the software U2F key (tests/soft_authenticator.py, SoftU2FAuthenticator)."""

from __future__ import annotations

import base64
import functools
import hashlib
import os
import secrets
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from fido2 import cbor
from fido2.cose import ES256, CoseKey
from fido2.ctap import CtapError
from fido2.ctap1 import APDU, ApduError, Ctap1, SignatureData
from fido2.ctap2.base import Ctap2
from fido2.hid import CAPABILITY, CTAPHID
from soft_authenticator import (
    CHECK_ONLY,
    DONT_ENFORCE_PRESENCE_AND_SIGN,
    ENFORCE_PRESENCE_AND_SIGN,
    U2F_AUTHENTICATE,
    U2F_REGISTER,
    SoftAuthenticator,
    SoftU2FAuthenticator,
)

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
EASY = "lockout:\n  max_failures: 100\n  hard_lock_after: 100\n"
APP = hashlib.sha256(RP.encode()).digest()


def enroll(store: Store, key: Any, user: str = "alice", **kw: Any) -> Any:
    kw.setdefault("rp_id", RP)
    return DeviceManager(store).enroll_fido(user, key, CTX, **kw)


def stored_count(store: Store, user: str = "alice") -> int | None:
    return next(d for d in store.list_devices(user) if d.kind == "fido2").sign_count


def set_stored(mfa_env: MfaEnv, value: int) -> None:
    with mfa_env.raw() as raw:
        raw.execute("UPDATE devices SET sign_count = ? WHERE kind = 'fido2'", (value,))


def pam_step(verifier: Verifier, keys: list[Any], user: str = "alice", timeout: float = 5.0) -> tuple[Any, list[str]]:
    from pam_module import fido

    said: list[str] = []
    return fido.authenticate_with_key(said.append, verifier, user, CTX, keys, timeout=timeout), said


def u2f_assertion(key: SoftU2FAuthenticator, verifier: Verifier, user: str = "alice", control: int = 0x03) -> Any:
    """What the PAM step builds from a U2F key's answer, for a fresh request of the core."""
    request = verifier.fido_request(user)
    assert request is not None
    rp_id, challenge, allowed, _ = request
    handle = next(h for h in allowed if h in key.credentials)
    client_data = fido2_key.client_data_hash(challenge, rp_id)
    app = hashlib.sha256(rp_id.encode()).digest()
    data = client_data + app + bytes([len(handle)]) + handle
    response = SignatureData(Ctap1(key).send_apdu(ins=U2F_AUTHENTICATE, p1=control, data=data))
    return fido2_key.u2f_assertion(handle, rp_id, response), rp_id, challenge


@pytest.fixture
def store(mfa_env: MfaEnv) -> Store:
    return mfa_env.open(mfa_env.initialise(EASY))


@pytest.fixture
def env(store: Store, mfa_env: MfaEnv) -> tuple[Store, Verifier, SoftU2FAuthenticator]:
    key = SoftU2FAuthenticator()
    enroll(store, key)
    key.requests.clear()
    return store, mfa_env.verifier(store), key


# -- the software U2F key itself: fido2's Ctap1 talks to it unchanged ---------------------------


def test_soft_u2f_key_speaks_u2f_as_fido2s_ctap1_expects() -> None:
    key = SoftU2FAuthenticator()
    assert not key.capabilities & CAPABILITY.CBOR and not key.capabilities & CAPABILITY.NMSG
    with pytest.raises(ValueError, match="does not support CTAP2"):
        Ctap2(key)  # fido2 itself looks at the capabilities first
    with pytest.raises(CtapError) as cbor_err:
        key.call(CTAPHID.CBOR, b"\x04")  # getInfo anyway: the key answers CTAPHID_ERROR
    assert cbor_err.value.code == CtapError.ERR.INVALID_COMMAND
    ctap1 = Ctap1(key)
    assert ctap1.get_version() == "U2F_V2"
    challenge = secrets.token_bytes(32)
    registration = ctap1.register(challenge, APP)
    registration.verify(APP, challenge)  # the attestation signature, under the self-signed certificate
    with pytest.raises(Exception):  # noqa: B017 (fido2 raises its own InvalidSignature)
        registration.verify(APP, bytes(32))
    handle = registration.key_handle
    assert handle in key.credentials and len(registration.public_key) == 65
    with pytest.raises(ApduError) as err:  # check-only, own handle: "a real request would need a touch"
        ctap1.authenticate(challenge, APP, handle, check_only=True)
    assert err.value.code == APDU.USE_NOT_SATISFIED
    for foreign_app, foreign_handle in ((APP, secrets.token_bytes(64)), (bytes(32), handle)):
        for check_only in (True, False):
            with pytest.raises(ApduError) as err:
                ctap1.authenticate(challenge, foreign_app, foreign_handle, check_only=check_only)
            assert err.value.code == APDU.WRONG_DATA
    key.sign_count = 41
    signed = ctap1.authenticate(challenge, APP, handle)
    assert signed.user_presence == 0x01 and signed.counter == 42
    signed.verify(APP, challenge, registration.public_key)
    with pytest.raises(Exception):  # noqa: B017
        signed.verify(APP, bytes(32), registration.public_key)
    unpresent = SignatureData(
        ctap1.send_apdu(
            ins=U2F_AUTHENTICATE,
            p1=DONT_ENFORCE_PRESENCE_AND_SIGN,
            data=challenge + APP + bytes([len(handle)]) + handle,
        )
    )
    assert unpresent.user_presence == 0x00 and unpresent.counter == 43
    unpresent.verify(APP, challenge, registration.public_key)
    key.user_present = False  # no touch: 0x6985 for every request that needs one, as from a real key
    for request in (lambda: ctap1.register(challenge, APP), lambda: ctap1.authenticate(challenge, APP, handle)):
        with pytest.raises(ApduError) as err:
            request()
        assert err.value.code == APDU.USE_NOT_SATISFIED
    assert key.sign_count == 43  # nothing was signed
    key.user_present, key.touch_after = True, 2  # touched after two polls
    for _ in range(2):
        with pytest.raises(ApduError):
            ctap1.authenticate(challenge, APP, handle)
    assert ctap1.authenticate(challenge, APP, handle).counter == 44
    # Short-length APDU framing (what older hosts send) is answered too.
    short = bytes([0, U2F_AUTHENTICATE, CHECK_ONLY, 0, 65 + len(handle)]) + challenge + APP + bytes([len(handle)])
    assert key.call(CTAPHID.MSG, short + handle) == b"\x69\x85"
    assert key.call(CTAPHID.MSG, bytes([0x80, 0x03, 0, 0])) == b"\x6e\x00"  # CLA not supported
    assert key.call(CTAPHID.MSG, bytes([0, 0x40, 0, 0])) == b"\x6d\x00"  # INS not supported


def test_a_ctap2_soft_key_refuses_u2f_messages() -> None:
    with pytest.raises(CtapError) as err:
        Ctap1(SoftAuthenticator()).get_version()
    assert err.value.code == CtapError.ERR.INVALID_COMMAND


# -- enrollment ---------------------------------------------------------------------------------


def test_enrolling_a_u2f_key_stores_a_verifiable_credential(store: Store) -> None:
    key = SoftU2FAuthenticator()
    touched: list[int] = []
    device = enroll(store, key, label="old yubikey", touch=lambda: touched.append(len(key.requests)))
    (handle,) = key.credentials
    assert fido2_key.credential_id(device) == handle
    assert device.params["protocol"] == "u2f" and device.params["aaguid"] == "00" * 16
    assert device.sign_count == 0 and device.params["uv"] == "preferred" and device.params["resident"] is False
    assert device.params["rp_id"] == RP and device.params["enrollment_uv"] == "none"
    assert device.label == "old yubikey" and device.usable
    # The request: application parameter SHA-256(RP id), challenge parameter a client data hash.
    registers = [body for ins, _, body in key.requests if ins == U2F_REGISTER]
    assert len(registers) == 1 and registers[0][32:] == APP
    assert touched == [1]  # after the version probe, before the register
    # The stored COSE ES256 key is the key's credential key: it verifies what that key signs.
    cose = CoseKey.parse(cbor.decode(fido2_key.unb64(device.params["public_key"])))
    assert cose[1] == 2 and cose[3] == -7 and cose[-1] == 1
    private = key.credentials[handle][1]
    point = private.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
    assert b"\x04" + cose[-2] + cose[-3] == point
    # The same COSE ES256 map as fido2's own conversion of a U2F key (and as the CTAP2 path stores).
    assert cbor.decode(fido2_key.unb64(device.params["public_key"])) == dict(ES256.from_ctap1(point))
    message = b"signed by the U2F credential"
    cose.verify(message, private.sign(message, ec.ECDSA(hashes.SHA256())))
    added = [r for r in store.audit_rows() if r.event == "device_added"]
    assert added[-1].detail["protocol"] == "u2f"


def test_a_u2f_registration_that_does_not_verify_is_refused(store: Store) -> None:
    class BadAttestation(SoftU2FAuthenticator):
        def _register(self, body: bytes) -> bytes:
            answer = bytearray(super()._register(body))
            answer[-1] ^= 1  # the attestation signature's last byte
            return bytes(answer)

    class OffCurve(SoftU2FAuthenticator):
        def _register(self, body: bytes) -> bytes:
            answer = bytearray(super()._register(body))
            answer[65] ^= 1  # the public key's Y
            return bytes(answer)

    with pytest.raises(InvalidInput, match="registration does not verify"):
        enroll(store, BadAttestation())
    with pytest.raises(InvalidInput, match="does not verify|not valid"):  # the signature covers the key too
        enroll(store, OffCurve())
    assert store.list_devices("alice") == []


def test_uv_required_and_resident_are_refused_for_a_u2f_key(store: Store) -> None:
    key = SoftU2FAuthenticator()
    before = len(store.audit_rows())
    with pytest.raises(InvalidInput, match="only U2F.*no user verification.*--uv required"):
        enroll(store, key, uv="required")
    with pytest.raises(InvalidInput, match="only U2F.*resident"):
        enroll(store, key, resident=True)
    assert key.credentials == {} and not any(ins == U2F_REGISTER for ins, _, _ in key.requests)
    assert store.list_devices("alice") == [] and len(store.audit_rows()) == before
    enroll(store, key, uv="discouraged")  # a touch only: accepted
    assert len(key.credentials) == 1


def test_a_u2f_key_not_touched_in_time_stores_nothing(store: Store) -> None:
    key = SoftU2FAuthenticator()
    key.user_present = False
    with pytest.raises(InvalidInput, match="not touched within 0.3 seconds; nothing was stored"):
        enroll(store, key, touch_timeout=0.3)
    assert store.list_devices("alice") == []
    key.user_present, key.touch_after = True, 3  # touched a little later: the registration is asked again
    enroll(store, key, touch_timeout=10)
    assert sum(ins == U2F_REGISTER for ins, _, _ in key.requests) >= 4 and len(key.credentials) == 1


def test_cli_enroll_fido_with_a_u2f_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from cli_helpers import make_config, run_cli

    from pam_module import fido

    config = make_config(tmp_path)
    key = SoftU2FAuthenticator()
    monkeypatch.setattr(fido, "attached_keys", lambda: [key])
    rc, out, err = run_cli(config, "enroll", "fido", "alice", "--uv", "required", "--rp-id", RP)
    assert rc == 5 and "speaks only U2F" in err and "--uv required" in err and "nothing was stored" in err
    rc, _, err = run_cli(config, "enroll", "fido", "alice", "--resident", "--rp-id", RP)
    assert rc == 5 and "resident" in err
    assert run_cli(config, "devices", "list", "alice")[1].startswith("no devices")
    rc, out, err = run_cli(config, "enroll", "fido", "alice", "--rp-id", RP, "--pin-stdin", stdin="1234\n")
    assert rc == 0, err
    assert "Touch your security key" in out and "FIDO2 (U2F)" in out and "a U2F key" in out
    assert "1234" not in out + err  # no PIN is read from a U2F key
    capsys.readouterr()
    rc, _, _ = run_cli(config, "enroll", "fido", "--help")  # argparse writes the help to sys.stdout
    text = " ".join(capsys.readouterr().out.split())
    assert rc == 0 and "FIDO2 or U2F security key" in text and "only U2F (CTAP1)" in text
    assert "--uv required and --resident are refused for such a key" in text


# -- the PAM FIDO step ----------------------------------------------------------------------------


def test_pam_step_logs_in_with_a_u2f_key(env: Any) -> None:
    from pam_module import fido

    store, verifier, key = env
    key.sign_count = 6
    decision, said = pam_step(verifier, [key])
    assert decision is not None and decision.accepted and said == [fido.TOUCH_PROMPT]
    assert stored_count(store) == 7 == key.sign_count
    # Check-only first (no touch), then enforce-user-presence-and-sign.
    assert [(ins, p1) for ins, p1, _ in key.requests] == [
        (U2F_AUTHENTICATE, CHECK_ONLY),
        (U2F_AUTHENTICATE, ENFORCE_PRESENCE_AND_SIGN),
    ]
    key.touch_after = 3  # the user touches a moment later: the module asks again until then
    decision, said = pam_step(verifier, [key])
    assert decision is not None and decision.accepted and stored_count(store) == 8
    assert store.audit_rows()[-1].reason == "accepted: fido2 key"


def test_adapter_logs_in_with_a_u2f_key_and_falls_back_without_a_touch(
    env: Any, mfa_env: MfaEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pam_handle import FakePamHandle

    from devicedb.models import PUBLIC_FAILURE_MESSAGE
    from pam_module import adapter, fido

    store, _, key = env
    config = mfa_env.root / "mfaguard.yaml"
    config.write_text(mfa_env.yaml(EASY) + f"logging:\n  file: {mfa_env.root}/pam.log\n")
    config.chmod(0o600)
    argv = ["pam_mfaguard.py", f"config={config}"]
    monkeypatch.setattr(fido, "attached_keys", lambda: [key])
    monkeypatch.setattr(fido, "authenticate_with_key", functools.partial(fido.authenticate_with_key, timeout=0.5))
    handle = FakePamHandle("alice", {}, [])
    assert adapter.authenticate(handle, 0, argv) == handle.PAM_SUCCESS
    assert handle.prompts == [fido.TOUCH_PROMPT]
    key.user_present = False  # nobody touches it: the code prompt, and no failure for the key
    handle = FakePamHandle("alice", {}, ["123456"] * 3)
    assert adapter.authenticate(handle, 0, argv) == handle.PAM_AUTH_ERR
    assert handle.prompts[0] == fido.TOUCH_PROMPT and PUBLIC_FAILURE_MESSAGE not in handle.prompts[:2]
    assert handle.prompts.count(adapter.DEFAULT_PROMPT) == 3
    assert stored_count(store) == 1


def test_no_touch_in_time_falls_back_to_the_code(env: Any) -> None:
    from pam_module import fido

    store, verifier, key = env
    key.user_present = False
    decision, said = pam_step(verifier, [key], timeout=0.5)
    assert decision is None and said == [fido.TOUCH_PROMPT]  # the caller asks for a code
    assert store.lock_state("alice").failures == 0 and stored_count(store) == 0
    assert key.sign_count == 0  # nothing was signed


def test_u2f_sign_counter_rule(env: Any, mfa_env: MfaEnv) -> None:
    store, verifier, key = env
    set_stored(mfa_env, 10)
    for presented in (9, 10):
        key.sign_count = presented - 1  # the key adds one before it signs
        decision, _ = pam_step(verifier, [key])
        assert decision is not None and decision.result is Result.BAD_CODE
        assert store.audit_rows(user="alice")[-2].reason == "fido2: possible clone"
        assert store.audit_rows(user="alice")[-2].detail == {"stored": 10, "presented": presented}
        assert stored_count(store) == 10
    key.sign_count = 10
    decision, _ = pam_step(verifier, [key])
    assert decision is not None and decision.accepted and stored_count(store) == 11
    assert store.lock_state("alice").failures == 0  # a success clears the two failures


def test_foreign_key_handles_and_other_keys_are_not_used(env: Any, mfa_env: MfaEnv) -> None:
    store, verifier, key = env
    stranger = SoftU2FAuthenticator()
    enroll(store, stranger, user="bob")
    decision, said = pam_step(verifier, [stranger])
    assert decision is None and said == []  # check-only said "not mine" (0x6A80): no touch asked
    assert [p1 for _, p1, _ in stranger.requests if p1 != 0] == [CHECK_ONLY]  # only the probe
    assert pam_step(verifier, [SoftAuthenticator()])[0] is None  # a CTAP2 key without her credential
    # A key that does hold her handle, but for another RP (application parameter): not hers here.
    (handle,) = key.credentials
    key.credentials[handle] = (hashlib.sha256(b"pam://elsewhere").digest(), key.credentials[handle][1])
    assert pam_step(verifier, [key])[0] is None
    key.credentials[handle] = (APP, key.credentials[handle][1])
    # bob's U2F assertion presented for alice: the core refuses it.
    bobs, rp_id, challenge = u2f_assertion(stranger, verifier, user="bob")
    assert verifier.verify_fido("alice", bobs, rp_id, challenge, CTX).result is Result.BAD_CODE
    assert store.audit_rows(user="alice")[-1].reason == "fido2: not a credential of this user"
    assert pam_step(verifier, [stranger, key])[0].accepted  # the next key is tried


def test_the_core_checks_u2f_signatures_like_any_assertion(env: Any) -> None:
    """The authData built from U2F's answer goes through check_assertion unchanged: presence, the
    signature over authData || challenge parameter, the RP id hash."""
    store, verifier, key = env
    unpresent, rp_id, challenge = u2f_assertion(key, verifier, control=DONT_ENFORCE_PRESENCE_AND_SIGN)
    assert verifier.verify_fido("alice", unpresent, rp_id, challenge, CTX).result is Result.BAD_CODE
    assert store.audit_rows(user="alice")[-1].reason == "fido2: no user presence (the key was not touched)"
    good, rp_id, challenge = u2f_assertion(key, verifier)
    _, fresh, _, _ = verifier.fido_request("alice")
    assert verifier.verify_fido("alice", good, rp_id, fresh, CTX).result is Result.BAD_CODE  # another challenge
    assert store.audit_rows(user="alice")[-1].reason == "fido2: signature does not verify"
    assert verifier.verify_fido("alice", good, rp_id, challenge, CTX).accepted
    with pytest.raises(ValueError, match="0x05"):  # U2F defines no UV bit: a presence byte 0x05 is refused
        fido2_key.u2f_assertion(b"h" * 16, RP, SignatureData(b"\x05" + bytes(4) + b"sig"))


# -- pam_u2f migration ----------------------------------------------------------------------------


def system_users() -> tuple[str, str]:
    import pwd

    names = {entry.pw_name for entry in pwd.getpwall()}
    chosen = [n for n in ("daemon", "bin", "sys", "nobody") if n in names][:2]
    if len(chosen) < 2:
        pytest.skip("needs two system accounts (daemon, bin, sys or nobody) in the passwd database")
    return chosen[0], chosen[1]


def test_a_pam_u2f_line_from_a_u2f_key_migrates_and_logs_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The U2F soft key registers as pam_u2f had it (application parameter SHA-256 of the origin); its
    credential is written as pamu2fcfg writes it (libfido2: base64 handle, X||Y, es256; pam_u2f 1.0:
    web-safe handle, hex point), migrated with `mfa-admin migrate pam-u2f`, and logs in through the
    PAM module."""
    from cli_helpers import make_config, run_cli
    from pam_handle import FakePamHandle

    from devicedb.settings import load_settings
    from pam_module import adapter, fido

    first, second = system_users()
    folder = tmp_path / "inst"
    folder.mkdir()
    config = make_config(folder, f"logging:\n  file: {folder}/pam.log\n")
    new_key, old_key = SoftU2FAuthenticator(), SoftU2FAuthenticator()
    new_reg = Ctap1(new_key).register(secrets.token_bytes(32), APP)
    old_reg = Ctap1(old_key).register(secrets.token_bytes(32), APP)
    b64 = base64.b64encode
    new_line = f"{first}:{b64(new_reg.key_handle).decode()},{b64(new_reg.public_key[1:]).decode()},es256,+presence"
    old_handle = base64.urlsafe_b64encode(old_reg.key_handle).decode().rstrip("=")
    old_line = f"{second}:{old_handle},{old_reg.public_key.hex()}"
    authfile = tmp_path / "u2f_keys"
    authfile.write_text(f"{new_line}\n{old_line}\n")
    os.chmod(authfile, 0o644)
    rc, out, err = run_cli(config, "migrate", "pam-u2f", str(authfile), "--origin", RP)
    assert rc == 0, err
    assert "2 credential(s) imported" in out
    argv = ["pam_mfaguard.py", f"config={config}"]
    for user, key in ((first, new_key), (second, old_key)):
        key.sign_count = 20
        monkeypatch.setattr(fido, "attached_keys", lambda key=key: [key])
        handle = FakePamHandle(user, {}, [])
        handle.service = "sudo"
        assert adapter.authenticate(handle, 0, argv) == handle.PAM_SUCCESS, (folder / "pam.log").read_text()
        assert handle.prompts == [fido.TOUCH_PROMPT]
    with Store.open(load_settings(str(config))) as store:
        assert stored_count(store, first) == 21 and stored_count(store, second) == 21
        # The other user's key does not log in as the first one.
        verifier = Verifier(store.settings, store=store)
        assert pam_step(verifier, [old_key], user=first)[0] is None


def test_a_u2f_signature_does_not_pass_for_a_device_that_requires_uv(env: Any, mfa_env: MfaEnv) -> None:
    """A U2F key cannot verify its user: for a device with uv required (a migrated +pin line, say)
    its signature is a failed attempt, with the core's reason; then the code prompts as usual."""
    store, verifier, key = env
    with mfa_env.raw() as raw:
        raw.execute("UPDATE devices SET params = json_set(params, '$.uv', 'required') WHERE kind = 'fido2'")
    decision, _ = pam_step(verifier, [key])
    assert decision is not None and decision.result is Result.BAD_CODE
    assert store.audit_rows(user="alice")[-1].reason == "fido2: user verification required but not performed"
    assert store.lock_state("alice").failures == 1 and stored_count(store) == 0
