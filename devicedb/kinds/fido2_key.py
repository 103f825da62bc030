"""FIDO2 security keys used where the login happens (console, sudo), as pam_u2f does.

mfaguard is its own relying party: the RP id defaults to ``pam://HOSTNAME``, the client data hash
is SHA-256 over a fresh random challenge, and an assertion is checked for the RP id hash, user
presence (always), user verification (when the device asks for it), the signature under the
stored COSE key, and the sign counter rule of WebAuthn section 6.1.1. The fido2 package is
imported only here, and only when a FIDO key is actually used.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import socket
from dataclasses import dataclass
from typing import Any

from devicedb.kinds import Match
from devicedb.models import Device

KIND = "fido2"
FINGERPRINT_DOMAIN = "fido2"
UV_POLICIES = ("required", "preferred", "discouraged")
_UP, _UV = 0x01, 0x04


def default_rp_id() -> str:
    return f"pam://{socket.gethostname()}"


def client_data_hash(challenge: bytes, rp_id: str) -> bytes:
    """What the authenticator signs besides its authData: bound to this challenge and this RP."""
    return hashlib.sha256(b"mfaguard-fido2-v1\0" + rp_id.encode() + b"\0" + challenge).digest()


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True)
class Assertion:
    credential_id: bytes
    auth_data: bytes
    signature: bytes


@dataclass(frozen=True)
class Check:
    ok: bool
    reason: str
    sign_count: int = 0
    possible_clone: bool = False


def credential_id(device: Device) -> bytes:
    return unb64(str(device.params["credential_id"]))


def check_assertion(device: Device, assertion: Assertion, rp_id: str, challenge: bytes, *, require_uv: bool) -> Check:
    """Every check of one assertion against one enrolled credential; the counter rule last."""
    from fido2 import cbor
    from fido2.cose import CoseKey

    data = assertion.auth_data
    if len(data) < 37:
        return Check(False, "authenticator data too short")
    if not hmac.compare_digest(data[:32], hashlib.sha256(rp_id.encode()).digest()):
        return Check(False, "RP id hash does not match")
    flags = data[32]
    if not flags & _UP:
        return Check(False, "no user presence (the key was not touched)")
    if require_uv and not flags & _UV:
        return Check(False, "user verification required but not performed")
    counter = int.from_bytes(data[33:37], "big")
    try:
        decoded = cbor.decode(unb64(str(device.params["public_key"])))
        if not isinstance(decoded, dict):
            return Check(False, "the stored public key is damaged")
        key = CoseKey.parse(decoded)
        key.verify(data + client_data_hash(challenge, rp_id), assertion.signature)
    except Exception:
        return Check(False, "signature does not verify")
    stored = device.sign_count or 0
    if (stored or counter) and counter <= stored:
        return Check(False, f"sign counter went from {stored} to {counter}: possible clone", counter, True)
    return Check(True, "accepted", counter)


def code_lengths(device: Device) -> set[int]:
    return set()  # a security key takes no typed code


def match(device: Device, secret: bytes, code: str, now: float, window: int) -> Match | None:
    return None


def describe(device: Device) -> dict[str, Any]:
    return {"rp_id": device.params.get("rp_id"), "uv": device.params.get("uv"), "sign_count": device.sign_count}
