"""FIDO2 security keys used where the login happens (console, sudo), as pam_u2f does.

mfaguard is its own relying party: the RP id defaults to ``pam://HOSTNAME``, the client data hash
is SHA-256 over a fresh random challenge, and an assertion is checked for the RP id hash, user
presence (always), user verification (when the device asks for it), the signature under the
stored COSE key, and the sign counter rule of WebAuthn section 6.1.1. The fido2 package is
imported only here, and only when a FIDO key is actually used.

A key whose user verification is a PIN (getInfo option clientPin, no built-in UV) gets it through
CTAP2's clientPin command, PIN/UV protocol 2 or 1 as the key offers: the PIN is sent encrypted under
an ECDH key agreement, the key answers with a pinUvAuthToken, and the request carries
pinUvAuthParam = authenticate(token, clientDataHash). The key itself counts wrong PINs.

A key that speaks only CTAP1/U2F (no CBOR capability, or getInfo fails) is driven through fido2's
``Ctap1``: the application parameter is SHA-256 of the RP id and the challenge parameter is the
same client data hash. U2F's signature is over application parameter || user-presence byte ||
counter || challenge parameter, which is exactly WebAuthn's authData (with no extensions) followed
by the client data hash, so ``u2f_assertion`` turns U2F's answer into the ``Assertion`` that
``check_assertion`` checks like any other: one verify path for both protocols.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from devicedb.errors import InvalidInput
from devicedb.kinds import Match
from devicedb.models import Device

if TYPE_CHECKING:
    from collections.abc import Callable
    from threading import Event

    from fido2.ctap import CtapDevice
    from fido2.ctap1 import SignatureData
    from fido2.ctap2.base import Ctap2
    from fido2.ctap2.pin import PinProtocol

KIND = "fido2"
FINGERPRINT_DOMAIN = "fido2"
UV_POLICIES = ("required", "preferred", "discouraged")
_UP, _UV = 0x01, 0x04
U2F = "u2f"  # params["protocol"] of a credential registered through CTAP1/U2F
U2F_POLL_SECONDS = 0.25  # how often a U2F key is asked again while it waits for its touch
U2F_MAX_KEY_HANDLE = 255  # U2F sends the key handle's length in one byte


def default_rp_id() -> str:
    return f"pam://{socket.gethostname()}"


MAX_RP_ID = 253
# pam_u2f's origin form (pam://HOST, https://HOST[/...]: a scheme, "://", a non-empty host) or a bare
# WebAuthn RP id (a domain name). Printable ASCII without spaces: an IDN goes in its xn-- form.
_RP_ID = re.compile(
    r"[A-Za-z][A-Za-z0-9+.-]*://[A-Za-z0-9._~\[\]:-]+(?:[/?#][!-~]*)?|[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?",
    re.ASCII,
)


def check_rp_id(rp_id: str, option: str = "--rp-id") -> str:
    """A relying party id an administrator gave, or InvalidInput naming the option and the forms accepted."""
    if not isinstance(rp_id, str) or not 1 <= len(rp_id) <= MAX_RP_ID or not _RP_ID.fullmatch(rp_id):
        raise InvalidInput(
            f"{option} {rp_id!r} is not an RP id; give pam://HOSTNAME (pam_u2f's form and the default), "
            f"https://HOST, or a domain name: 1 to {MAX_RP_ID} printable ASCII characters, no spaces"
        )
    return rp_id


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


class PinRejected(InvalidInput):
    """The key refused the PIN (wrong, blocked, or not acceptable). ``audit_reason`` never holds the PIN."""

    def __init__(self, message: str, audit_reason: str, retries: int | None) -> None:
        super().__init__(message)
        self.audit_reason = audit_reason
        self.retries = retries


@dataclass(frozen=True)
class PinUv:
    """A pinUvAuthParam for one request, and the PIN/UV protocol it was made with."""

    param: bytes
    protocol: int


def key_options(ctap: Ctap2) -> dict[str, bool]:
    return {str(k): bool(v) for k, v in ctap.info.options.items()}


def uses_pin(options: dict[str, bool]) -> bool:
    """Whether this key's user verification is its PIN: a PIN is set and there is no built-in UV."""
    return options.get("clientPin") is True and options.get("uv") is not True


def _retries(ctap: Ctap2, protocol: PinProtocol) -> int | None:
    from fido2.ctap import CtapError
    from fido2.ctap2.pin import ClientPin

    try:
        return int(ClientPin(ctap, protocol).get_pin_retries()[0])
    except (CtapError, OSError, ValueError, KeyError, TypeError):
        return None


def pin_auth(ctap: Ctap2, pin: str, permission: str, rp_id: str, client_data: bytes) -> PinUv:
    """Exchange the PIN for a pinUvAuthToken limited to ``permission`` ("make_credential" or
    "get_assertion") and this RP, and return the pinUvAuthParam over ``client_data``.

    Raises PinRejected for a wrong, blocked or unacceptable PIN (with the retries the key reports);
    other CtapError and OSError (the key went away) propagate."""
    from fido2.ctap import CtapError
    from fido2.ctap2.pin import ClientPin

    if permission not in ("make_credential", "get_assertion"):
        raise ValueError(f"no such permission: {permission}")
    client_pin = ClientPin(ctap)  # PIN/UV protocol 2 where the key has it, else 1
    flag = (
        ClientPin.PERMISSION.MAKE_CREDENTIAL if permission == "make_credential" else ClientPin.PERMISSION.GET_ASSERTION
    )
    if len(pin) < 4:
        # fido2 refuses it before sending, and a key would too (minimum PIN length 4): no retry is spent.
        raise PinRejected(
            "wrong PIN: a security key's PIN has at least 4 characters", "wrong PIN (too short; not sent)", None
        )
    try:
        token = client_pin.get_pin_token(pin, flag, rp_id)
    except ValueError:
        raise PinRejected(
            "the PIN is too long for a security key (at most 63 bytes)", "PIN not acceptable", None
        ) from None
    except CtapError as exc:
        code = exc.code
        if code == CtapError.ERR.PIN_INVALID:
            left = _retries(ctap, client_pin.protocol)
            count = "an unknown number of" if left is None else str(left)
            raise PinRejected(
                f"wrong PIN; the key reports {count} PIN retries left (at 0 its PIN is blocked and only a reset, "
                "which erases every credential on it, makes it usable again)",
                f"wrong PIN ({count} retries left on the key)",
                left,
            ) from None
        if code == CtapError.ERR.PIN_AUTH_BLOCKED:
            left = _retries(ctap, client_pin.protocol)
            count = "an unknown number of" if left is None else str(left)
            raise PinRejected(
                f"wrong PIN three times in a row: the key takes no PIN until it is unplugged and plugged in again "
                f"({count} PIN retries left)",
                f"PIN blocked until the key is re-plugged ({count} retries left)",
                left,
            ) from None
        if code == CtapError.ERR.PIN_BLOCKED:
            raise PinRejected(
                "the key's PIN is blocked (no retries left); only a reset, which erases every credential on it, "
                "makes it usable again",
                "PIN blocked on the key (no retries left)",
                0,
            ) from None
        if code == CtapError.ERR.PIN_NOT_SET:
            raise PinRejected("the key has no PIN set", "no PIN set on the key", None) from None
        if code == CtapError.ERR.PIN_POLICY_VIOLATION:
            raise PinRejected(
                "the key refuses this PIN (its PIN policy)", "PIN refused by the key's policy", None
            ) from None
        raise
    return PinUv(bytes(client_pin.protocol.authenticate(token, client_data)), int(client_pin.protocol.VERSION))


def open_ctap2(device: CtapDevice) -> Ctap2 | None:
    """fido2's CTAP2 client on this key, or None when the key speaks no CTAP2: no CBOR capability,
    or getInfo fails (a U2F-only key, or one that went away)."""
    from fido2.ctap import CtapError
    from fido2.ctap2.base import Ctap2
    from fido2.hid import CAPABILITY

    try:
        if not int(device.capabilities) & CAPABILITY.CBOR:
            return None
        return Ctap2(device)
    except (CtapError, OSError, ValueError):
        return None


def speaks_u2f(device: CtapDevice) -> bool:
    """Whether the key may take CTAP1/U2F messages (CTAPHID_MSG): its capabilities do not say NMSG."""
    from fido2.hid import CAPABILITY

    try:
        return not int(device.capabilities) & CAPABILITY.NMSG
    except (OSError, ValueError, TypeError):
        return False


class U2fTimeout(Exception):
    """A U2F key was not touched before the deadline (or the wait was cancelled)."""


def u2f_poll(request: Callable[[], Any], event: Event, poll: float = U2F_POLL_SECONDS) -> Any:
    """Send a U2F request that needs a touch until the key stops answering "conditions not satisfied"
    (0x6985: it is waiting for its touch) or ``event`` is set (U2fTimeout). A U2F key does not hold a
    request open as CTAP2 does: the client asks again. Other ApduErrors, CtapError and OSError propagate."""
    from fido2.ctap1 import APDU, ApduError

    while not event.is_set():
        try:
            return request()
        except ApduError as exc:
            if exc.code != APDU.USE_NOT_SATISFIED:
                raise
        event.wait(poll)
    raise U2fTimeout("the key was not touched in time")


def cose_from_u2f_point(point: bytes) -> dict[int, Any]:
    """U2F's 65-byte uncompressed P-256 public key (0x04||X||Y) as the COSE ES256 key that the CTAP2
    path stores. A point that is not on the curve raises ValueError."""
    from cryptography.hazmat.primitives.asymmetric import ec

    if len(point) != 65 or point[0] != 4:
        raise ValueError(f"a U2F public key is an uncompressed P-256 point of 65 bytes, not {len(point)} bytes")
    ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)  # refuses a point off the curve
    # What fido2's ES256.from_ctap1 makes (written out: it is untyped): EC2, ES256, P-256, X, Y.
    return {1: 2, 3: -7, -1: 1, -2: point[1:33], -3: point[33:65]}


def u2f_assertion(key_handle: bytes, rp_id: str, response: SignatureData) -> Assertion:
    """A U2F authentication response as the Assertion check_assertion takes: authData = application
    parameter (SHA-256 of the RP id, 32) || user-presence byte (1) || counter (4), exactly the bytes the
    key signed before the challenge parameter. A presence byte with bits other than 0x01 (reserved in
    U2F) is refused (ValueError): U2F has no flag for user verification or anything else."""
    raw = bytes(response)
    if len(raw) < 6:
        raise ValueError("the U2F response is too short")
    if raw[0] & ~_UP:
        raise ValueError(f"the U2F user-presence byte is 0x{raw[0]:02x}; only 0x00 and 0x01 are defined")
    return Assertion(key_handle, hashlib.sha256(rp_id.encode()).digest() + raw[:5], bytes(response.signature))


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
