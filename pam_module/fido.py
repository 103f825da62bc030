"""A local FIDO2 key at the PAM prompt (console, sudo): imported only for users who have one.

fido2's import costs about 100 ms, so the adapter loads this module only when the core says the
user has an enabled FIDO2 key. With a key attached, the user is told to touch it; the assertion is
checked by the core. Without a key, or if it times out, the caller falls back to the code prompt.

When the user's device requires user verification and the key's only verification is its PIN
(clientPin set, no built-in UV), the module first checks silently (up=false, as pam_u2f does) that
the key holds one of the user's credentials, then asks for the PIN (echo off), exchanges it for a
pinUvAuthToken with the getAssertion permission for this RP, and sends pinUvAuthParam with the
request. A wrong PIN is a failed attempt through the core (lockout counter, audit row); an empty or
aborted answer ends the login, as at the code prompt.

A key that speaks only CTAP1/U2F (no CBOR capability, or getInfo fails) is asked through fido2's
Ctap1: first "check-only" (control byte 0x07, no touch) for each of the user's key handles, to find
the one it holds; then, after the touch prompt, "enforce user presence and sign" (0x03), asked again
every 0.25 s while the key answers that it waits for its touch. Its answer becomes the authenticator
data the core checks (fido2_key.u2f_assertion), on the same path as a CTAP2 assertion. A key that
speaks CTAP2 is asked through CTAP2 even for a U2F-registered credential: keys that speak both
accept their U2F key handles in getAssertion (libfido2, and so pam_u2f, rely on this too).
"""

from __future__ import annotations

import hashlib
import struct
import threading
from collections.abc import Callable, Mapping
from typing import Any

from devicedb.kinds import fido2_key
from devicedb.models import Context, Decision
from devicedb.verifier import Verifier

TOUCH_PROMPT = "Touch your security key"
PIN_PROMPT = "PIN for your security key: "
TOUCH_SECONDS = 30.0


def attached_keys() -> list[Any]:
    """The FIDO2 keys on this machine's USB (CTAP HID)."""
    from fido2.hid import CtapHidDevice

    return list(CtapHidDevice.list_devices())


def _holds_credential(ctap: Any, rp_id: str, allow_list: list[Mapping[str, Any]]) -> bool:
    """A silent pre-flight (up=false: no touch, no PIN): does this key hold one of the credentials?
    Only a definite "no credentials" answer says no; a key that cannot do the probe is tried anyway."""
    from fido2.ctap import CtapError

    try:
        ctap.get_assertion(rp_id, bytes(32), allow_list, options={"up": False})
    except CtapError as exc:
        return bool(exc.code != CtapError.ERR.NO_CREDENTIALS)
    return True


def _pin_step(
    ask_pin: Callable[[str], Any],
    ctap: Any,
    verifier: Verifier,
    user: str,
    context: Context,
    rp_id: str,
    client_data: bytes,
) -> fido2_key.PinUv | Decision:
    """The pinUvAuthParam for this request, or the decision that ends the FIDO step: a wrong PIN
    (a failed attempt, counted and audited by the core) or an empty or aborted answer (abandoned)."""
    try:
        answer = ask_pin(PIN_PROMPT)
    except Exception as exc:
        return verifier.record_abandoned(user, context, f"fido2 PIN: conversation error: {type(exc).__name__}")
    if answer is None or not str(answer).strip():
        return verifier.record_abandoned(user, context, "fido2 PIN: empty answer")
    try:
        return fido2_key.pin_auth(ctap, str(answer), "get_assertion", rp_id, client_data)
    except fido2_key.PinRejected as exc:
        return verifier.record_fido_failure(user, context, exc.audit_reason)
    finally:
        del answer


def _u2f_step(
    tell: Callable[[], None],
    key: Any,
    verifier: Verifier,
    user: str,
    context: Context,
    rp_id: str,
    challenge: bytes,
    allowed: list[bytes],
    timeout: float,
) -> Decision | None:
    """The core's decision on a U2F (CTAP1) key's signature, or None: the key holds none of the
    credentials, failed, went away, or was not touched in time (the caller tries the next key)."""
    from fido2.ctap import CtapError
    from fido2.ctap1 import APDU, ApduError, Ctap1

    failures = (CtapError, OSError, ValueError, struct.error)
    ctap1 = Ctap1(key)
    client_data = fido2_key.client_data_hash(challenge, rp_id)
    app_param = hashlib.sha256(rp_id.encode()).digest()
    handle: bytes | None = None
    for candidate in allowed:
        if len(candidate) > fido2_key.U2F_MAX_KEY_HANDLE:
            continue  # a CTAP2 credential id too long for U2F: not a U2F key's
        try:
            ctap1.authenticate(client_data, app_param, candidate, check_only=True)
        except ApduError as exc:
            if exc.code == APDU.USE_NOT_SATISFIED:  # "it is mine; a real request would need a touch"
                handle = candidate
                break
            continue  # 0x6A80 (not this key's handle, or another RP's), or another refusal
        except failures:
            return None  # the key failed or went away
        return None  # a check-only request must never be signed: not a key to trust
    if handle is None:
        return None
    found: bytes = handle
    tell()
    event = threading.Event()
    cancel = threading.Timer(timeout, event.set)
    cancel.start()
    try:
        response = fido2_key.u2f_poll(lambda: ctap1.authenticate(client_data, app_param, found), event)
        assertion = fido2_key.u2f_assertion(found, rp_id, response)
    except (fido2_key.U2fTimeout, ApduError, *failures):
        return None  # no touch in time, refused, malformed, or unplugged
    finally:
        cancel.cancel()
    return verifier.verify_fido(user, assertion, rp_id, challenge, context)


def authenticate_with_key(
    say: Any,
    verifier: Verifier,
    user: str,
    context: Context,
    keys: list[Any],
    timeout: float = TOUCH_SECONDS,
    ask_pin: Callable[[str], Any] | None = None,
) -> Decision | None:
    """The core's decision on an assertion from the first attached key that holds one of the user's
    credentials, or None when there is no such key (or no touch in time): the caller then asks for a code.

    ``ask_pin(prompt)`` asks for a key's PIN with echo off; without it a key that needs its PIN is skipped.
    A decision whose result is ERROR (an abandoned PIN prompt, a database error) ends the login."""
    from fido2.ctap import CtapError

    request = verifier.fido_request(user)
    if request is None or not keys:
        return None
    rp_id, challenge, allowed, needs_uv = request
    client_data = fido2_key.client_data_hash(challenge, rp_id)
    allow_list: list[Mapping[str, Any]] = [{"type": "public-key", "id": c} for c in allowed]
    told = False

    def tell() -> None:
        nonlocal told
        if not told:
            say(TOUCH_PROMPT)
            told = True

    for key in keys:
        ctap = fido2_key.open_ctap2(key)
        if ctap is None:
            # A U2F-only key (or one that went away). U2F has no user verification: the core refuses its
            # signature for a credential whose device requires UV, and accepts it for the others.
            if fido2_key.speaks_u2f(key):
                decision = _u2f_step(tell, key, verifier, user, context, rp_id, challenge, allowed, timeout)
                if decision is not None:
                    return decision
            continue
        options: dict[str, bool] | None = None
        pin_uv: fido2_key.PinUv | None = None
        if needs_uv:
            if fido2_key.uses_pin(fido2_key.key_options(ctap)):
                try:
                    if ask_pin is None or not _holds_credential(ctap, rp_id, allow_list):
                        continue
                    step = _pin_step(ask_pin, ctap, verifier, user, context, rp_id, client_data)
                except (CtapError, OSError, ValueError):
                    continue  # the key failed or went away during the PIN exchange: try the next one
                if isinstance(step, Decision):
                    return step
                pin_uv = step
            else:
                options = {"uv": True}  # built-in UV (a key with none refuses, and the next key is tried)
        tell()
        event = threading.Event()
        cancel = threading.Timer(timeout, event.set)
        cancel.start()
        try:
            response = ctap.get_assertion(
                rp_id,
                client_data,
                allow_list,
                options=options,
                pin_uv_param=pin_uv.param if pin_uv else None,
                pin_uv_protocol=pin_uv.protocol if pin_uv else None,
                event=event,
            )
        except (CtapError, OSError, ValueError):
            continue  # not this key's credential, cancelled, or unplugged: try the next one
        finally:
            cancel.cancel()
        assertion = fido2_key.Assertion(
            bytes(response.credential["id"]), bytes(response.auth_data), bytes(response.signature)
        )
        return verifier.verify_fido(user, assertion, rp_id, challenge, context)
    return None
