"""A software FIDO2 authenticator behind fido2's CtapDevice interface, speaking CTAP2 CBOR.

No USB key can exist on these machines (no /dev/uhid), so the real fido2 client code (Ctap2,
ClientPin) talks to this: P-256 credentials, a settable sign counter, switchable user presence and
verification, and a real clientPin (CTAP 2.1 section 6.5): P-256 ECDH key agreement, PIN/UV
protocols 1 and 2 (fido2's own PinProtocolV1/V2 do the KDF, AES-CBC and HMAC on this side too),
getPinToken and getPinUvAuthTokenUsingPinWithPermissions, getPinRetries, a retry counter, the
power-cycle block after three wrong PINs in a row, and verification of pinUvAuthParam in
makeCredential and getAssertion with the errors a real key returns.

Two kinds of key:

- ``SoftAuthenticator()`` (no PIN): built-in user verification, as before; ``user_verified`` is its
  verdict at every touch, whatever was asked.
- ``SoftAuthenticator(pin="1234")``: a key whose only user verification is its PIN (like most
  YubiKeys). The UV flag is set only after a valid pinUvAuthParam; the ``uv`` option is refused;
  makeCredential without a pinUvAuthParam fails with PUAT_REQUIRED. ``pin=None, builtin_uv=False``
  is such a key with no PIN set yet.

Both answer only CTAPHID_CBOR; any other CTAPHID command raises CtapError(INVALID_COMMAND), as
fido2's CtapHidDevice does when a key answers CTAPHID_ERROR.

And a key of the older kind:

- ``SoftU2FAuthenticator()``: a key that speaks only CTAP1/U2F (FIDO U2F raw message formats v1.2),
  for fido2's ``Ctap1`` unchanged. Its capabilities lack CBOR (a CBOR request raises
  CtapError(INVALID_COMMAND)); it answers CTAPHID_MSG APDUs (short or extended length): U2F_REGISTER
  (INS 0x01) with a self-signed P-256 attestation certificate made with ``cryptography``,
  U2F_AUTHENTICATE (INS 0x02) with control bytes 0x03 (enforce user presence and sign), 0x07
  (check-only: SW_CONDITIONS_NOT_SATISFIED 0x6985 for its own key handle, SW_WRONG_DATA 0x6A80 for a
  foreign one or one of another application) and 0x08 (sign without user presence: presence byte
  0x00), and U2F_VERSION (INS 0x03, "U2F_V2"). A settable counter (``sign_count``, ``count_step``) and
  user presence (``user_present``; without it a request that needs a touch gets 0x6985, as from a
  real key, and the client must ask again); ``touch_after`` = n answers 0x6985 n times before the touch.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import secrets
import struct
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.oid import NameOID
from fido2 import cbor
from fido2.cose import ES256
from fido2.ctap import CtapDevice, CtapError
from fido2.ctap2.pin import PinProtocol, PinProtocolV1, PinProtocolV2
from fido2.hid import CAPABILITY, CTAPHID
from fido2.webauthn import AttestedCredentialData, AuthenticatorData

AAGUID = bytes.fromhex("6d66616775617264736f66746b657931")  # "mfaguardsoftkey1"
_GET_INFO, _MAKE_CREDENTIAL, _GET_ASSERTION, _CLIENT_PIN = 0x04, 0x01, 0x02, 0x06
_ERR_NO_CREDENTIALS = 0x2E
_ERR_INVALID_COMMAND = 0x01
ERR = CtapError.ERR

MAX_PIN_RETRIES = 8
PERM_MAKE_CREDENTIAL, PERM_GET_ASSERTION = 0x01, 0x02
# clientPin subcommands
_GET_RETRIES, _GET_KEY_AGREEMENT, _GET_PIN_TOKEN, _GET_TOKEN_WITH_PERMISSIONS = 0x01, 0x02, 0x05, 0x09


class _Refused(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


class SoftAuthenticator(CtapDevice):
    def __init__(
        self,
        *,
        pin: str | None = None,
        builtin_uv: bool | None = None,
        pin_protocols: tuple[int, ...] = (2, 1),
        token_permissions: bool = True,
    ) -> None:
        self.credentials: dict[bytes, tuple[str, ec.EllipticCurvePrivateKey]] = {}
        self.sign_count = 0
        self.user_present = True
        self.user_verified = True  # the built-in UV's verdict
        self.count_step = 1  # 0 models an authenticator that keeps no counter
        # Built-in UV by default only for a key without a PIN (the behaviour before PINs existed here).
        self.builtin_uv = (pin is None) if builtin_uv is None else builtin_uv
        self.pin: str | None = pin
        self.pin_protocols = pin_protocols
        # CTAP 2.1 pinUvAuthToken (permissions, getPinUvAuthTokenUsingPinWithPermissions); False: CTAP 2.0 only.
        self.token_permissions = token_permissions
        self.pin_retries = MAX_PIN_RETRIES
        self.consecutive_wrong = 0
        self.requests: list[tuple[int, dict[Any, Any]]] = []  # (command, parameters), for tests to inspect
        self._protocols: dict[int, PinProtocol] = {1: PinProtocolV1(), 2: PinProtocolV2()}
        self._new_key_agreement()
        self._token: bytes | None = None
        self._token_permissions = 0
        self._token_rp: str | None = None

    # -- test controls -------------------------------------------------------------
    def set_pin(self, pin: str | None) -> None:
        self.pin = pin
        self.pin_retries = MAX_PIN_RETRIES
        self.consecutive_wrong = 0
        self._token = None

    def power_cycle(self) -> None:
        """Unplug and plug in again: the three-in-a-row block and the token go, the retry counter stays."""
        self.consecutive_wrong = 0
        self._token = None
        self._new_key_agreement()

    def _new_key_agreement(self) -> None:
        self._key_agreement = ec.generate_private_key(ec.SECP256R1())

    # -- CtapDevice ----------------------------------------------------------------
    @property
    def capabilities(self) -> int:
        return int(CAPABILITY.CBOR)

    @classmethod
    def list_devices(cls):  # type: ignore[no-untyped-def]
        return iter(())

    def _flags(self, attested: bool = False, *, up: bool = True, uv: bool = False) -> AuthenticatorData.FLAG:
        flags = AuthenticatorData.FLAG(0)
        if self.user_present and up:
            flags |= AuthenticatorData.FLAG.UP
        if uv:
            flags |= AuthenticatorData.FLAG.UV
        if attested:
            flags |= AuthenticatorData.FLAG.AT
        return flags

    def call(self, cmd: int, data: bytes = b"", event: Any = None, on_keepalive: Any = None) -> bytes:
        if cmd != CTAPHID.CBOR:
            raise CtapError(ERR.INVALID_COMMAND)  # the key answers CTAPHID_ERROR, as a CTAP2-only key does
        command, params = data[0], (cbor.decode(data[1:]) if len(data) > 1 else {})
        self.requests.append((command, dict(params)))
        try:
            if command == _GET_INFO:
                return b"\x00" + cbor.encode(self._info())
            if command == _MAKE_CREDENTIAL:
                return b"\x00" + cbor.encode(self._make_credential(params))
            if command == _GET_ASSERTION:
                return b"\x00" + cbor.encode(self._get_assertion(params))
            if command == _CLIENT_PIN:
                return b"\x00" + cbor.encode(self._client_pin(params))
        except _Refused as refused:
            return bytes([refused.code])
        return bytes([_ERR_INVALID_COMMAND])

    # -- getInfo -----------------------------------------------------------------------
    def _info(self) -> dict[int, Any]:
        options: dict[str, bool] = {"rk": True, "up": True, "clientPin": self.pin is not None}
        if self.builtin_uv:
            options["uv"] = True
        if self.token_permissions:
            options["pinUvAuthToken"] = True
        versions = ["FIDO_2_0", "FIDO_2_1"] if self.token_permissions else ["FIDO_2_0"]
        return {1: versions, 3: AAGUID, 4: options, 5: 1200, 6: list(self.pin_protocols)}

    # -- user verification in makeCredential / getAssertion --------------------------
    def _verify_uv(
        self, params: dict[int, Any], param_key: int, client_data_hash: bytes, rp_id: str, permission: int
    ) -> bool:
        """True when user verification was performed: a valid pinUvAuthParam, or the built-in UV."""
        options = params.get(param_key - 1) or {}  # options sit just before pinUvAuthParam (7/8, 5/6)
        pin_uv_param = params.get(param_key)
        protocol_version = params.get(param_key + 1)
        if pin_uv_param is not None:
            if len(pin_uv_param) == 0:  # the platform's "touch to select" probe
                raise _Refused(ERR.PIN_INVALID if self.pin is not None else ERR.PIN_NOT_SET)
            if protocol_version is None:
                raise _Refused(ERR.MISSING_PARAMETER)
            if protocol_version not in self.pin_protocols:
                raise _Refused(ERR.INVALID_PARAMETER)
            if self._token is None:
                raise _Refused(ERR.PIN_AUTH_INVALID)
            expected = self._protocols[protocol_version].authenticate(self._token, client_data_hash)
            if not hmac.compare_digest(expected, bytes(pin_uv_param)):
                raise _Refused(ERR.PIN_AUTH_INVALID)
            if not self._token_permissions & permission:
                raise _Refused(ERR.PIN_AUTH_INVALID)
            if self._token_rp is not None and self._token_rp != rp_id:
                raise _Refused(ERR.PIN_AUTH_INVALID)
            if self.token_permissions:
                self._token_rp = rp_id
                # CTAP 2.1: a token's makeCredential/getAssertion permissions are used up by one request.
                self._token_permissions &= ~(PERM_MAKE_CREDENTIAL | PERM_GET_ASSERTION)
            return True  # the uv option, if any, is then treated as false
        if options.get("uv"):
            if not self.builtin_uv:
                raise _Refused(ERR.INVALID_OPTION if self.token_permissions else ERR.UNSUPPORTED_OPTION)
            return self.user_verified
        return self.builtin_uv and self.user_verified

    def _make_credential(self, params: dict[int, Any]) -> dict[int, Any]:
        client_data_hash, rp_id = params[1], params[2]["id"]
        options = params.get(7) or {}
        if options.get("up") is False:
            raise _Refused(ERR.INVALID_OPTION)
        uv = self._verify_uv(params, 8, client_data_hash, rp_id, PERM_MAKE_CREDENTIAL)
        if not uv and self.pin is not None and not (self.builtin_uv and options.get("uv")):
            # Protected by a PIN, and no pinUvAuthParam: a real key wants one (no makeCredUvNotRqd here).
            raise _Refused(ERR.PUAT_REQUIRED)
        key = ec.generate_private_key(ec.SECP256R1())
        credential_id = secrets.token_bytes(32)
        self.credentials[credential_id] = (rp_id, key)
        attested = AttestedCredentialData.create(AAGUID, credential_id, ES256.from_cryptography_key(key.public_key()))
        auth_data = AuthenticatorData.create(
            hashlib.sha256(rp_id.encode()).digest(), self._flags(attested=True, uv=uv), self.sign_count, attested
        )
        return {1: "none", 2: bytes(auth_data), 3: {}}

    def _get_assertion(self, params: dict[int, Any]) -> dict[int, Any]:
        rp_id, client_data_hash = params[1], params[2]
        allowed = [c["id"] for c in params.get(3, [])]
        found = next((c for c in allowed if c in self.credentials and self.credentials[c][0] == rp_id), None)
        if found is None:
            raise _Refused(_ERR_NO_CREDENTIALS)
        options = params.get(5) or {}
        uv = self._verify_uv(params, 6, client_data_hash, rp_id, PERM_GET_ASSERTION)
        self.sign_count += self.count_step
        auth_data = bytes(
            AuthenticatorData.create(
                hashlib.sha256(rp_id.encode()).digest(),
                self._flags(up=options.get("up", True) is not False, uv=uv),
                self.sign_count,
            )
        )
        signature = self.credentials[found][1].sign(auth_data + client_data_hash, ec.ECDSA(hashes.SHA256()))
        return {1: {"type": "public-key", "id": found}, 2: auth_data, 3: signature}

    # -- clientPin -------------------------------------------------------------------
    def _client_pin(self, params: dict[int, Any]) -> dict[int, Any]:
        version, sub = params.get(1), params.get(2)
        if sub == _GET_RETRIES:
            return {3: self.pin_retries}
        if version not in self.pin_protocols:
            raise _Refused(ERR.INVALID_PARAMETER)
        protocol = self._protocols[version]
        if sub == _GET_KEY_AGREEMENT:
            numbers = self._key_agreement.public_key().public_numbers()
            cose = {1: 2, 3: -25, -1: 1, -2: numbers.x.to_bytes(32, "big"), -3: numbers.y.to_bytes(32, "big")}
            return {1: cose}
        if sub == _GET_PIN_TOKEN:
            if 9 in params or 10 in params:
                raise _Refused(ERR.INVALID_PARAMETER)  # permissions belong to subcommand 0x09
            return self._issue_token(protocol, params, PERM_MAKE_CREDENTIAL | PERM_GET_ASSERTION, None)
        if sub == _GET_TOKEN_WITH_PERMISSIONS and self.token_permissions:
            permissions = params.get(9)
            if permissions is None:
                raise _Refused(ERR.MISSING_PARAMETER)
            if permissions == 0:
                raise _Refused(ERR.INVALID_PARAMETER)
            if permissions & ~(PERM_MAKE_CREDENTIAL | PERM_GET_ASSERTION):
                raise _Refused(ERR.UNAUTHORIZED_PERMISSION)
            return self._issue_token(protocol, params, permissions, params.get(10))
        raise _Refused(ERR.INVALID_SUBCOMMAND)

    def _shared_secret(self, protocol: PinProtocol, key_agreement: Any) -> bytes:
        try:
            if key_agreement[1] != 2 or key_agreement[-1] != 1:
                raise ValueError("not an EC2 P-256 key")
            peer = ec.EllipticCurvePublicNumbers(
                int.from_bytes(key_agreement[-2], "big"), int.from_bytes(key_agreement[-3], "big"), ec.SECP256R1()
            ).public_key()
        except (KeyError, TypeError, ValueError):
            raise _Refused(ERR.INVALID_PARAMETER) from None
        z = self._key_agreement.exchange(ec.ECDH(), peer)
        return bytes(protocol.kdf(z))  # PinProtocolV1 and V2 both define kdf (the ABC does not)

    def _issue_token(
        self, protocol: PinProtocol, params: dict[int, Any], permissions: int, rp_id: str | None
    ) -> dict[int, Any]:
        if self.pin is None:
            raise _Refused(ERR.PIN_NOT_SET)
        if self.pin_retries == 0:
            raise _Refused(ERR.PIN_BLOCKED)
        if self.consecutive_wrong >= 3:
            raise _Refused(ERR.PIN_AUTH_BLOCKED)
        key_agreement, pin_hash_enc = params.get(3), params.get(6)
        if key_agreement is None or pin_hash_enc is None:
            raise _Refused(ERR.MISSING_PARAMETER)
        shared = self._shared_secret(protocol, key_agreement)
        self.pin_retries -= 1  # spent before the check, as the spec says, so that a pulled plug costs one
        try:
            pin_hash = protocol.decrypt(shared, bytes(pin_hash_enc))
        except ValueError:
            pin_hash = b""
        if not hmac.compare_digest(pin_hash, hashlib.sha256(self.pin.encode()).digest()[:16]):
            self._new_key_agreement()
            self.consecutive_wrong += 1
            if self.pin_retries == 0:
                raise _Refused(ERR.PIN_BLOCKED)
            if self.consecutive_wrong >= 3:
                raise _Refused(ERR.PIN_AUTH_BLOCKED)
            raise _Refused(ERR.PIN_INVALID)
        self.pin_retries = MAX_PIN_RETRIES
        self.consecutive_wrong = 0
        self._token = secrets.token_bytes(32)  # a new token voids the previous one
        self._token_permissions = permissions
        self._token_rp = rp_id
        return {2: protocol.encrypt(shared, self._token)}


def counter_bytes(value: int) -> bytes:
    return struct.pack(">I", value)


# -- CTAP1 / U2F ------------------------------------------------------------------------------------

U2F_REGISTER, U2F_AUTHENTICATE, U2F_VERSION = 0x01, 0x02, 0x03
ENFORCE_PRESENCE_AND_SIGN, CHECK_ONLY, DONT_ENFORCE_PRESENCE_AND_SIGN = 0x03, 0x07, 0x08
SW_NO_ERROR = 0x9000
SW_CONDITIONS_NOT_SATISFIED = 0x6985
SW_WRONG_DATA = 0x6A80
SW_WRONG_LENGTH = 0x6700
SW_CLA_NOT_SUPPORTED = 0x6E00
SW_INS_NOT_SUPPORTED = 0x6D00


def self_signed_certificate(key: ec.EllipticCurvePrivateKey, name: str = "mfaguard soft U2F key") -> bytes:
    """A DER X.509 certificate for ``key``, signed by itself (ECDSA with SHA-256), as attestation."""
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .sign(key, hashes.SHA256())
    )
    return certificate.public_bytes(Encoding.DER)


class _Status(Exception):
    def __init__(self, sw: int) -> None:
        super().__init__(sw)
        self.sw = sw


class SoftU2FAuthenticator(CtapDevice):
    """A U2F-only key behind fido2's CtapDevice interface: see the module docstring."""

    def __init__(self) -> None:
        self.attestation_key = ec.generate_private_key(ec.SECP256R1())
        self.attestation_certificate = self_signed_certificate(self.attestation_key)
        # key handle -> (application parameter, credential private key)
        self.credentials: dict[bytes, tuple[bytes, ec.EllipticCurvePrivateKey]] = {}
        self.sign_count = 0  # one counter for every credential, as most U2F keys keep
        self.count_step = 1
        self.user_present = True
        self.touch_after = 0  # answer 0x6985 this many more times before the touch "happens"
        self.requests: list[tuple[int, int, bytes]] = []  # (INS, P1, data), for tests to inspect

    @property
    def capabilities(self) -> int:
        return int(CAPABILITY.WINK)  # no CBOR, and no NMSG: it takes CTAPHID_MSG

    @classmethod
    def list_devices(cls):  # type: ignore[no-untyped-def]
        return iter(())

    def call(self, cmd: int, data: bytes = b"", event: Any = None, on_keepalive: Any = None) -> bytes:
        if cmd != CTAPHID.MSG:
            raise CtapError(ERR.INVALID_COMMAND)  # a U2F-only key answers CTAPHID_ERROR to CBOR
        try:
            return self._apdu(bytes(data)) + struct.pack(">H", SW_NO_ERROR)
        except _Status as status:
            return struct.pack(">H", status.sw)

    # -- APDU framing (ISO 7816-4, short or extended length) ------------------------------------
    def _apdu(self, apdu: bytes) -> bytes:
        if len(apdu) < 4:
            raise _Status(SW_WRONG_LENGTH)
        cla, ins, p1, _p2 = apdu[:4]
        rest = apdu[4:]
        if not rest:
            body = b""
        elif rest[0] == 0 and len(rest) >= 3:  # extended: 00 Lc1 Lc2 data [Le1 Le2]
            length = int.from_bytes(rest[1:3], "big")
            body = rest[3 : 3 + length]
            if len(body) != length or len(rest) - 3 - length not in (0, 2):
                raise _Status(SW_WRONG_LENGTH)
        elif len(rest) == 1:  # short, Le only
            body = b""
        else:  # short: Lc data [Le]
            length = rest[0]
            body = rest[1 : 1 + length]
            if len(body) != length or len(rest) - 1 - length not in (0, 1):
                raise _Status(SW_WRONG_LENGTH)
        if cla != 0:
            raise _Status(SW_CLA_NOT_SUPPORTED)
        self.requests.append((ins, p1, body))
        if ins == U2F_VERSION:
            if body:
                raise _Status(SW_WRONG_LENGTH)
            return b"U2F_V2"
        if ins == U2F_REGISTER:
            return self._register(body)
        if ins == U2F_AUTHENTICATE:
            return self._authenticate(p1, body)
        raise _Status(SW_INS_NOT_SUPPORTED)

    def _touched(self) -> bool:
        """Whether a touch is there for a request that needs one (each such request uses it up)."""
        if not self.user_present:
            return False
        if self.touch_after > 0:
            self.touch_after -= 1
            return False
        return True

    def _register(self, body: bytes) -> bytes:
        if len(body) != 64:
            raise _Status(SW_WRONG_LENGTH)
        challenge, application = body[:32], body[32:]
        if not self._touched():
            raise _Status(SW_CONDITIONS_NOT_SATISFIED)
        key = ec.generate_private_key(ec.SECP256R1())
        handle = secrets.token_bytes(64)
        self.credentials[handle] = (application, key)
        point = key.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
        signed = b"\x00" + application + challenge + handle + point
        signature = self.attestation_key.sign(signed, ec.ECDSA(hashes.SHA256()))
        return b"\x05" + point + bytes([len(handle)]) + handle + self.attestation_certificate + signature

    def _authenticate(self, control: int, body: bytes) -> bytes:
        if len(body) < 65 or len(body) != 65 + body[64]:
            raise _Status(SW_WRONG_LENGTH)
        challenge, application, handle = body[:32], body[32:64], body[65:]
        entry = self.credentials.get(handle)
        if entry is None or entry[0] != application:
            raise _Status(SW_WRONG_DATA)  # not made by this key, or for another application
        if control == CHECK_ONLY:
            raise _Status(SW_CONDITIONS_NOT_SATISFIED)  # "mine": a real request would need a touch
        if control == ENFORCE_PRESENCE_AND_SIGN:
            if not self._touched():
                raise _Status(SW_CONDITIONS_NOT_SATISFIED)
            presence = 0x01
        elif control == DONT_ENFORCE_PRESENCE_AND_SIGN:
            presence = 0x00
        else:
            raise _Status(SW_WRONG_DATA)
        self.sign_count += self.count_step
        signed_part = bytes([presence]) + struct.pack(">I", self.sign_count)
        signature = entry[1].sign(application + signed_part + challenge, ec.ECDSA(hashes.SHA256()))
        return signed_part + signature
