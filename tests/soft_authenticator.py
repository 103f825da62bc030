"""A software FIDO2 authenticator behind fido2's CtapDevice interface, speaking CTAP2 CBOR.

No USB key can exist on these machines (no /dev/uhid), so the real fido2 client code (Ctap2) talks
to this: P-256 credentials, a settable sign counter, and switchable user presence and verification.
"""

from __future__ import annotations

import hashlib
import secrets
import struct
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from fido2 import cbor
from fido2.cose import ES256
from fido2.ctap import CtapDevice
from fido2.hid import CAPABILITY, CTAPHID
from fido2.webauthn import AttestedCredentialData, AuthenticatorData

AAGUID = bytes.fromhex("6d66616775617264736f66746b657931")  # "mfaguardsoftkey1"
_GET_INFO, _MAKE_CREDENTIAL, _GET_ASSERTION = 0x04, 0x01, 0x02
_ERR_NO_CREDENTIALS = 0x2E
_ERR_INVALID_COMMAND = 0x01


class SoftAuthenticator(CtapDevice):
    def __init__(self) -> None:
        self.credentials: dict[bytes, tuple[str, ec.EllipticCurvePrivateKey]] = {}
        self.sign_count = 0
        self.user_present = True
        self.user_verified = True
        self.count_step = 1  # 0 models an authenticator that keeps no counter

    @property
    def capabilities(self) -> int:
        return int(CAPABILITY.CBOR)

    @classmethod
    def list_devices(cls):  # type: ignore[no-untyped-def]
        return iter(())

    def _flags(self, attested: bool = False) -> AuthenticatorData.FLAG:
        flags = AuthenticatorData.FLAG(0)
        if self.user_present:
            flags |= AuthenticatorData.FLAG.UP
        if self.user_verified:
            flags |= AuthenticatorData.FLAG.UV
        if attested:
            flags |= AuthenticatorData.FLAG.AT
        return flags

    def call(self, cmd: int, data: bytes = b"", event: Any = None, on_keepalive: Any = None) -> bytes:
        if cmd != CTAPHID.CBOR:
            return bytes([_ERR_INVALID_COMMAND])
        command, params = data[0], (cbor.decode(data[1:]) if len(data) > 1 else {})
        if command == _GET_INFO:
            info = {1: ["FIDO_2_0"], 3: AAGUID, 4: {"rk": True, "up": True, "uv": True}, 5: 1200}
            return b"\x00" + cbor.encode(info)
        if command == _MAKE_CREDENTIAL:
            rp_id = params[2]["id"]
            key = ec.generate_private_key(ec.SECP256R1())
            credential_id = secrets.token_bytes(32)
            self.credentials[credential_id] = (rp_id, key)
            attested = AttestedCredentialData.create(
                AAGUID, credential_id, ES256.from_cryptography_key(key.public_key())
            )
            auth_data = AuthenticatorData.create(
                hashlib.sha256(rp_id.encode()).digest(), self._flags(attested=True), self.sign_count, attested
            )
            return b"\x00" + cbor.encode({1: "none", 2: bytes(auth_data), 3: {}})
        if command == _GET_ASSERTION:
            rp_id, client_data_hash = params[1], params[2]
            allowed = [c["id"] for c in params.get(3, [])]
            found = next((c for c in allowed if c in self.credentials and self.credentials[c][0] == rp_id), None)
            if found is None:
                return bytes([_ERR_NO_CREDENTIALS])
            self.sign_count += self.count_step
            auth_data = bytes(
                AuthenticatorData.create(hashlib.sha256(rp_id.encode()).digest(), self._flags(), self.sign_count)
            )
            signature = self.credentials[found][1].sign(auth_data + client_data_hash, ec.ECDSA(hashes.SHA256()))
            response = {1: {"type": "public-key", "id": found}, 2: auth_data, 3: signature}
            return b"\x00" + cbor.encode(response)
        return bytes([_ERR_INVALID_COMMAND])


def counter_bytes(value: int) -> bytes:
    return struct.pack(">I", value)
