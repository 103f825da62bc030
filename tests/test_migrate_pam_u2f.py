"""`mfa-admin migrate pam-u2f`: pam_u2f authfile lines become FIDO2 devices.

Lines are made as pamu2fcfg makes them: the credential id and libfido2's raw public key (es256:
X||Y; eddsa: the 32-byte key; rs256: modulus then exponent) in standard base64, the COSE type and
the options; and pam_u2f 1.0's old form (web-safe base64 key handle, hex uncompressed point).
"""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from fido2 import cbor
from fido2.cose import CoseKey
from fido2.ctap2.base import Ctap2
from fido2.webauthn import AuthenticatorData
from soft_authenticator import SoftAuthenticator

from devicedb.errors import InvalidInput
from devicedb.importers import pam_u2f
from devicedb.kinds import fido2_key
from devicedb.manage import DeviceManager
from devicedb.models import Context, Result
from devicedb.store import Store

if TYPE_CHECKING:
    from conftest import MfaEnv

CTX = Context(service="mfa-admin")
RP = "pam://testhost"
USERS = {"alice", "bob", "carol"}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()  # pamu2fcfg: standard alphabet, padded, one line


class Key:
    """A credential as pamu2fcfg would print it, with its private key kept for signing."""

    def __init__(self, cose_type: str = "es256") -> None:
        self.cose_type = cose_type
        self.credential_id = secrets.token_bytes(64)
        if cose_type == "es256":
            self.private: Any = ec.generate_private_key(ec.SECP256R1())
            self.raw = self.private.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)[1:]
        elif cose_type == "eddsa":
            self.private = ed25519.Ed25519PrivateKey.generate()
            self.raw = self.private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        else:
            self.private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            numbers = self.private.public_key().public_numbers()
            self.raw = numbers.n.to_bytes(256, "big") + numbers.e.to_bytes(3, "big")

    def field(self, options: str = "+presence") -> str:
        return f"{b64(self.credential_id)},{b64(self.raw)},{self.cose_type},{options}"

    def old_field(self) -> str:
        point = self.private.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
        return f"{base64.urlsafe_b64encode(self.credential_id).decode().rstrip('=')},{point.hex()}"

    def sign(self, message: bytes) -> bytes:
        if self.cose_type == "es256":
            return bytes(self.private.sign(message, ec.ECDSA(hashes.SHA256())))
        if self.cose_type == "eddsa":
            return bytes(self.private.sign(message))
        return bytes(self.private.sign(message, padding.PKCS1v15(), hashes.SHA256()))


def line(user: str, *fields: str) -> str:
    return f"{user}:" + ":".join(fields)


def read(*lines: str) -> pam_u2f.AuthFile:
    return pam_u2f.parse(("\n".join(lines) + "\n").encode(), "u2f_keys")


def parse(*lines: str) -> pam_u2f.AuthFile:
    authfile = read(*lines)
    authfile.check("u2f_keys")  # raises AuthFileError for any problem
    return authfile


def migrate(store: Store, *lines: str, **kw: Any) -> Any:
    kw.setdefault("rp_id", RP)
    kw.setdefault("user_exists", lambda user: user in USERS)
    return DeviceManager(store).migrate_pam_u2f(read(*lines), CTX, where="u2f_keys", **kw)


@pytest.fixture
def store(mfa_env: MfaEnv) -> Store:
    return mfa_env.open(mfa_env.initialise("lockout:\n  max_failures: 100\n  hard_lock_after: 100\n"))


def fido_devices(store: Store, user: str) -> list[Any]:
    return [d for d in store.list_devices(user) if d.kind == "fido2"]


def signed_login(store: Store, mfa_env: MfaEnv, user: str, key: Key, counter: int = 1, flags: int = 0x01) -> Result:
    """An assertion signed with the credential's private key, checked by the core (as a key would send it)."""
    verifier = mfa_env.verifier(store)
    request = verifier.fido_request(user)
    assert request is not None
    rp_id, challenge, allowed, _ = request
    assert key.credential_id in allowed
    auth_data = hashlib.sha256(rp_id.encode()).digest() + bytes([flags]) + counter.to_bytes(4, "big")
    signature = key.sign(auth_data + fido2_key.client_data_hash(challenge, rp_id))
    assertion = fido2_key.Assertion(key.credential_id, auth_data, signature)
    return verifier.verify_fido(user, assertion, rp_id, challenge, Context(service="sudo")).result


def audit_count(store: Store) -> int:
    return len(store.audit_rows())


# -- the format ----------------------------------------------------------------------------------


def test_parse_real_format_lines_and_public_key_bytes() -> None:
    es, ed, rs, second = Key("es256"), Key("eddsa"), Key("rs256"), Key("es256")
    authfile = parse(
        line("alice", es.field("+presence"), second.field("+presence+pin")),
        line("bob", ed.field("+presence+verification")),
        line("carol", rs.field("")),
    )
    by_id = {c.credential_id: c for c in authfile.credentials}
    assert set(by_id) == {es.credential_id, second.credential_id, ed.credential_id, rs.credential_id}
    alice = by_id[es.credential_id]
    assert (alice.user, alice.line, alice.index, alice.options, alice.old_format) == (
        "alice",
        1,
        1,
        ("+presence",),
        False,
    )
    assert by_id[second.credential_id].index == 2 and by_id[second.credential_id].uv_required
    assert by_id[ed.credential_id].options == ("+presence", "+verification")
    assert by_id[rs.credential_id].options == () and not by_id[rs.credential_id].uv_required
    # The raw libfido2 bytes become the COSE key of the same public key.
    cose = CoseKey.parse(alice.cose_key)
    assert cose[-2] + cose[-3] == es.raw and cose[3] == -7
    assert CoseKey.parse(by_id[ed.credential_id].cose_key)[-2] == ed.raw
    message = b"signed by the credential's private key"
    for k in (es, ed, rs):
        CoseKey.parse(by_id[k.credential_id].cose_key).verify(message, k.sign(message))  # raises if wrong
    # A 65-byte es256 key with the 0x04 prefix (what libfido2 also accepts) is the same key.
    point = b"\x04" + es.raw
    prefixed = f"{b64(es.credential_id)},{b64(point)},es256,+presence"
    assert parse(line("alice", prefixed)).credentials[0].cose_key == alice.cose_key


def test_parse_old_pam_u2f_hex_format() -> None:
    first, second = Key(), Key()
    authfile = parse(line("alice", first.old_field(), second.old_field()))
    creds = authfile.credentials
    assert [c.credential_id for c in creds] == [first.credential_id, second.credential_id]
    assert all(c.old_format and c.cose_type == "es256" and c.options == ("+presence",) for c in creds)
    cose = CoseKey.parse(creds[0].cose_key)
    assert cose[-2] + cose[-3] == first.raw


def test_bad_lines_are_reported_by_number() -> None:
    good, off_curve = Key(), Key()
    broken_point = bytearray(off_curve.raw)
    broken_point[-1] ^= 1
    lines = [
        line("alice", good.field()),  # 1 (fine)
        "just some text",  # 2
        line("bob", f"!!!notbase64!!!,{b64(good.raw)},es256,+presence"),  # 3
        line("carol", f"{b64(Key().credential_id)},{b64(good.raw)},es384,+presence"),  # 4
        line("dave", f"{b64(Key().credential_id)},{b64(bytes(broken_point))},es256,+presence"),  # 5
        line("erin", f"*,{b64(good.raw)},es256,+presence+pin"),  # 6
        line("frank", Key().field("+presence+fingerprint")),  # 7
        line("gina", f"{b64(Key().credential_id)},{b64(good.raw[:40])},es256,+presence"),  # 8
        line("hank", Key().field() + ",*"),  # 9: a fork's fifth field
        "",  # blank lines and comments are skipped
        "# a comment",
    ]
    with pytest.raises(pam_u2f.AuthFileError) as err:
        parse(*lines)
    problems = err.value.problems
    assert read(*lines).problems == problems and len(read(*lines).credentials) == 1  # line 1 is fine
    assert [p.split(":")[0].split(",")[0] for p in problems] == [f"line {n}" for n in (2, 3, 4, 5, 6, 7, 8, 9)]
    text = "\n".join(problems)
    assert "key handle is not base64" in text and "es384" in text and "not valid" in text
    assert "resident credential" in text and "enroll fido erin --resident" in text
    assert "+fingerprint" in text and "40 bytes" in text and "5 comma-separated fields" in text
    with pytest.raises(pam_u2f.AuthFileError, match="no credential"):
        parse("# nothing here")
    assert pam_u2f.parse(b"alice:\xff\xfe\n", "u2f_keys").problems == ["not UTF-8 text (byte 6)"]


# -- the migration ---------------------------------------------------------------------------------


def test_migration_stores_devices_as_enrollment_does(store: Store, mfa_env: MfaEnv) -> None:
    es, pinned, ed, rs = Key("es256"), Key("es256"), Key("eddsa"), Key("rs256")
    result = migrate(
        store,
        line("alice", es.field("+presence"), pinned.field("+presence+pin")),
        line("bob", ed.field("+presence+verification")),
        line("carol", rs.field("+presence")),
    )
    assert not result.dry_run and len(result.added) == 4 and result.skipped == []
    alice = fido_devices(store, "alice")
    assert [d.params["uv"] for d in alice] == ["discouraged", "required"]
    assert fido_devices(store, "bob")[0].params["uv"] == "required"
    for device in alice + fido_devices(store, "bob") + fido_devices(store, "carol"):
        assert device.sign_count == 0 and device.params["rp_id"] == RP and device.params["migrated"] == "pam-u2f"
        assert device.usable and not device.params["resident"]
    assert fido2_key.credential_id(alice[0]) == es.credential_id
    assert alice[1].params["pam_u2f_options"] == "+presence+pin" and alice[1].params["cose_type"] == "es256"
    stored = CoseKey.parse(cbor.decode(fido2_key.unb64(alice[0].params["public_key"])))
    assert stored[-2] + stored[-3] == es.raw
    added = [r for r in store.audit_rows() if r.event == "device_added"]
    assert len(added) == 4 and all(r.reason == "migrated from pam_u2f" and r.service == "mfa-admin" for r in added)
    assert {r.detail["line"] for r in added} == {1, 2, 3}
    notes = "\n".join(result.notes)
    assert f"RP id {RP}" in notes and "uv required" in notes and "uv discouraged" in notes
    # Every migrated key then signs in through the core: the stored COSE keys are the right ones.
    assert signed_login(store, mfa_env, "bob", ed, flags=0x05) is Result.ACCEPTED
    assert signed_login(store, mfa_env, "carol", rs, counter=7) is Result.ACCEPTED
    assert fido_devices(store, "carol")[0].sign_count == 7
    assert signed_login(store, mfa_env, "bob", ed, counter=2, flags=0x01) is Result.BAD_CODE  # +verification: UV


def test_old_format_lines_migrate_and_verify(store: Store, mfa_env: MfaEnv) -> None:
    old = Key()
    result = migrate(store, line("alice", old.old_field()))
    (device,) = result.added
    assert device.params["uv"] == "discouraged" and device.params["cose_type"] == "es256"
    assert any("pam_u2f 1.0" in n for n in result.notes)
    assert signed_login(store, mfa_env, "alice", old) is Result.ACCEPTED


def test_problems_store_nothing(store: Store) -> None:
    before = audit_count(store)
    good, other = Key(), Key()
    with pytest.raises(pam_u2f.AuthFileError) as err:  # format problems and user problems, in one report
        migrate(store, line("alice", good.field()), "nonsense", line("mallory", other.field()))
    assert err.value.problems == [
        "line 2: expected USER:KEYHANDLE,PUBLICKEY,COSETYPE,OPTIONS[:...]",
        "line 3: user 'mallory' is unknown to this system (not in passwd)",
    ]
    with pytest.raises(pam_u2f.AuthFileError) as err:
        migrate(store, line("alice", good.field()), line("mallory", other.field()))
    assert err.value.problems == ["line 2: user 'mallory' is unknown to this system (not in passwd)"]
    with pytest.raises(pam_u2f.AuthFileError) as err:
        migrate(store, line("alice", good.field()), line("bob", good.field()))
    assert err.value.problems == ["line 2, key 1: the same credential as line 1, key 1"]
    with pytest.raises(pam_u2f.AuthFileError, match="refused"):
        migrate(store, line("alice", good.field()), line("bob\u200b", other.field()), user_exists=lambda u: True)
    with pytest.raises(pam_u2f.AuthFileError, match="owned by bob"):
        migrate(store, line("bob", other.field()), line("alice", good.field()), only_user="bob")
    assert store.list_devices() == [] and audit_count(store) == before


def test_device_limit_applies_in_the_same_transaction(mfa_env: MfaEnv) -> None:
    store = mfa_env.open(mfa_env.initialise("max_devices: 3\n"))
    DeviceManager(store).enroll_totp("alice", CTX, pending=False)
    keys = [Key() for _ in range(3)]
    with pytest.raises(pam_u2f.AuthFileError) as err:
        migrate(store, line("bob", Key().field()), line("alice", *(k.field() for k in keys)))
    (problem,) = err.value.problems
    assert problem.startswith("line 2 (alice): alice has 1 device(s), and 3 more would exceed max_devices = 3")
    assert fido_devices(store, "bob") == [] and len(store.list_devices("alice")) == 1  # bob's line too: all or nothing
    result = migrate(store, line("alice", keys[0].field(), keys[1].field()))
    assert len(result.added) == 2 and len(store.list_devices("alice")) == 3


def test_duplicates_are_reported_not_doubled(store: Store) -> None:
    first, second = Key(), Key()
    text = line("alice", first.field(), second.field())
    assert len(migrate(store, text).added) == 2
    again = migrate(store, text)  # the same file again: nothing doubled
    assert again.added == [] and len(again.skipped) == 2 and "already enrolled for alice" in again.skipped[0]
    assert len(fido_devices(store, "alice")) == 2
    third = Key()
    more = migrate(store, line("alice", first.field(), third.field()))  # one new key on the line
    assert [fido2_key.credential_id(d) for d in more.added] == [third.credential_id] and len(more.skipped) == 1
    with pytest.raises(pam_u2f.AuthFileError) as err:  # alice's credential under bob's name
        migrate(store, line("bob", Key().field(), first.field()))
    assert err.value.problems == ["line 1, key 2 (bob): this credential is already enrolled for another user"]
    assert fido_devices(store, "bob") == []


def test_only_the_last_line_of_a_user_counts(store: Store) -> None:
    old, new = Key(), Key()
    result = migrate(store, line("alice", old.field()), line("bob", Key().field()), line("alice", new.field()))
    assert [fido2_key.credential_id(d) for d in fido_devices(store, "alice")] == [new.credential_id]
    assert any("line 1 (alice): not imported" in n for n in result.notes)


def test_dry_run_stores_nothing(store: Store) -> None:
    before = audit_count(store)
    result = migrate(store, line("alice", Key().field("+presence+pin")), dry_run=True)
    assert result.dry_run and len(result.added) == 1 and result.added[0].params["uv"] == "required"
    assert store.list_devices() == [] and audit_count(store) == before
    with pytest.raises(pam_u2f.AuthFileError):  # a dry run reports the same problems
        migrate(store, line("mallory", Key().field()), dry_run=True)


def test_require_uv_and_origin(store: Store) -> None:
    result = migrate(store, line("alice", Key().field()), rp_id="pam://other-host", require_uv=True)
    assert result.added[0].params["uv"] == "required" and result.added[0].params["rp_id"] == "pam://other-host"
    with pytest.raises(InvalidInput, match="--origin"):
        migrate(store, line("bob", Key().field()), rp_id="pam://bad\nhost")


def test_end_to_end_a_soft_key_credential_migrates_and_logs_in(store: Store, mfa_env: MfaEnv) -> None:
    """The soft key registers as pamu2fcfg would have it do, its line is written as pamu2fcfg writes
    it, it is migrated, and the PAM module's FIDO step (fido2's client code) then logs in with it."""
    from pam_module import fido

    def register(key: SoftAuthenticator, pin: str | None = None) -> str:
        ctap = Ctap2(key)
        pin_uv = None
        if pin is not None:
            pin_uv = fido2_key.pin_auth(ctap, pin, "make_credential", RP, bytes(32))
        response = ctap.make_credential(
            bytes(32),
            {"id": RP, "name": RP},
            {"id": secrets.token_bytes(32), "name": "alice"},
            [{"type": "public-key", "alg": -7}],
            pin_uv_param=pin_uv.param if pin_uv else None,
            pin_uv_protocol=pin_uv.protocol if pin_uv else None,
        )
        credential = AuthenticatorData(response.auth_data).credential_data
        assert credential is not None
        xy = bytes(credential.public_key[-2]) + bytes(credential.public_key[-3])
        options = "+presence+pin" if pin else "+presence"
        return f"{b64(bytes(credential.credential_id))},{b64(xy)},es256,{options}"

    touch_key, pin_key = SoftAuthenticator(), SoftAuthenticator(pin="s3cret-PIN")
    migrate(store, line("alice", register(touch_key)), line("bob", register(pin_key, "s3cret-PIN")))
    verifier = mfa_env.verifier(store)
    said: list[str] = []
    decision = fido.authenticate_with_key(said.append, verifier, "alice", Context(service="sudo"), [touch_key])
    assert decision is not None and decision.accepted and said == [fido.TOUCH_PROMPT]
    assert fido_devices(store, "alice")[0].sign_count == touch_key.sign_count > 0
    # bob's line said +pin: uv required, so the PAM step asks for the key's PIN.
    said.clear()
    decision = fido.authenticate_with_key(
        said.append, verifier, "bob", Context(service="sudo"), [pin_key], ask_pin=lambda prompt: "s3cret-PIN"
    )
    assert decision is not None and decision.accepted and said == [fido.TOUCH_PROMPT]
    decision = fido.authenticate_with_key(
        said.append, verifier, "bob", Context(service="sudo"), [pin_key], ask_pin=lambda prompt: "wr0ng-PIN"
    )
    assert decision is not None and decision.result is Result.BAD_CODE


# -- the command ----------------------------------------------------------------------------------


def installation(tmp_path: Path) -> Path:
    from cli_helpers import make_config

    folder = tmp_path / "inst"
    folder.mkdir()
    return make_config(folder)


def authfile(path: Path, *lines: str, mode: int = 0o644) -> Path:
    path.write_text("\n".join(lines) + "\n")
    os.chmod(path, mode)
    return path


def system_users() -> tuple[str, str]:
    import pwd

    names = {entry.pw_name for entry in pwd.getpwall()}
    chosen = [n for n in ("daemon", "bin", "sys", "nobody") if n in names][:2]
    if len(chosen) < 2:
        pytest.skip("needs two system accounts (daemon, bin, sys or nobody) in the passwd database")
    return chosen[0], chosen[1]


def test_cli_migrate_pam_u2f(tmp_path: Path) -> None:
    from cli_helpers import run_cli

    config = installation(tmp_path)
    first, second = system_users()
    path = authfile(tmp_path / "u2f_mappings", line(first, Key().field()), line(second, Key().field("+presence+pin")))
    rc, out, err = run_cli(config, "migrate", "pam-u2f", str(path), "--origin", RP, "--dry-run")
    assert rc == 0, err
    assert f"would add a device for {first}" in out and "(dry run: 2 credential(s) would be imported" in out
    assert run_cli(config, "devices", "list")[1].startswith("no devices")
    rc, out, err = run_cli(config, "migrate", "pam-u2f", str(path), "--rp-id", RP)
    assert rc == 0, err
    assert f"added device 1 for {first}" in out and "UV required" in out and "2 credential(s) imported" in out
    rc, out, _ = run_cli(config, "devices", "list", second)
    assert "pam_u2f key 1" in out and f"RP {RP}" in out
    rc, out, _ = run_cli(config, "migrate", "pam-u2f", str(path), "--rp-id", RP)  # again: nothing doubled
    assert rc == 0 and "already enrolled" in out and "0 credential(s) imported" in out
    bad = authfile(tmp_path / "bad", line(first, Key().field()), "nonsense", line("no-such-user-x", Key().field()))
    rc, out, err = run_cli(config, "migrate", "pam-u2f", str(bad))
    assert rc == 5 and "nothing was stored" in err
    assert "\n  line 2: expected USER:" in err and "\n  line 3: user 'no-such-user-x' is unknown" in err
    assert len(run_cli(config, "devices", "list", "--json")[1].split('"id"')) == 3  # still the two devices


def test_cli_refuses_an_authfile_others_could_write_or_a_symlink(tmp_path: Path) -> None:
    from cli_helpers import run_cli

    config = installation(tmp_path)
    first, _ = system_users()
    path = authfile(tmp_path / "u2f_keys", line(first, Key().field()), mode=0o664)
    rc, _, err = run_cli(config, "migrate", "pam-u2f", str(path))
    assert rc == 5 and "others could write it" in err and "chmod go-w" in err
    os.chmod(path, 0o644)
    link = tmp_path / "link"
    link.symlink_to(path)
    rc, _, err = run_cli(config, "migrate", "pam-u2f", str(link))
    assert rc == 5 and "symlink" in err
    rc, _, err = run_cli(config, "migrate", "pam-u2f", str(tmp_path / "missing"))
    assert rc == 5 and "does not exist" in err
    assert run_cli(config, "devices", "list")[1].startswith("no devices")


@pytest.mark.root
def test_cli_a_file_owned_by_a_user_holds_only_that_users_keys(tmp_path: Path) -> None:
    import pwd

    from cli_helpers import run_cli

    config = installation(tmp_path)
    owner, other = system_users()
    path = authfile(tmp_path / "u2f_keys", line(other, Key().field()), line(owner, Key().field()))
    os.chown(path, pwd.getpwnam(owner).pw_uid, -1)
    rc, _, err = run_cli(config, "migrate", "pam-u2f", str(path))
    assert rc == 5 and f"owned by {owner}" in err and "line 1" in err
    authfile(path, line(owner, Key().field()))
    rc, out, err = run_cli(config, "migrate", "pam-u2f", str(path))
    assert rc == 0, err
    assert f"for {owner}" in out


@pytest.mark.parametrize("origin", ["", "pam://", "://host", "pam:/host", "pam://my host", "pam://höst", "x" * 254])
def test_an_empty_or_malformed_origin_is_refused_not_replaced_by_the_default(store: Store, origin: str) -> None:
    before = audit_count(store)
    with pytest.raises(InvalidInput, match=r"--origin .* is not an RP id; give pam://HOSTNAME"):
        migrate(store, line("alice", Key().field()), rp_id=origin)
    assert store.list_devices() == [] and audit_count(store) == before


def test_cli_migrate_pam_u2f_with_an_empty_origin_stores_nothing(tmp_path: Path) -> None:
    from cli_helpers import run_cli

    config = installation(tmp_path)
    first, _second = system_users()
    path = authfile(tmp_path / "u2f_mappings", line(first, Key().field()))
    rc, _out, err = run_cli(config, "migrate", "pam-u2f", str(path), "--origin", "")
    assert rc == 5 and "--origin '' is not an RP id" in err, err
    assert run_cli(config, "devices", "list")[1].startswith("no devices")
