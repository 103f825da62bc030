"""A local FIDO2 key at the PAM prompt (console, sudo): imported only for users who have one.

fido2's import costs about 100 ms, so the adapter loads this module only when the core says the
user has an enabled FIDO2 key. With a key attached, the user is told to touch it; the assertion is
checked by the core. Without a key, or if it times out, the caller falls back to the code prompt.
"""

from __future__ import annotations

import threading
from typing import Any

from devicedb.kinds import fido2_key
from devicedb.models import Context, Decision
from devicedb.verifier import Verifier

TOUCH_PROMPT = "Touch your security key"
TOUCH_SECONDS = 30.0


def attached_keys() -> list[Any]:
    """The FIDO2 keys on this machine's USB (CTAP HID)."""
    from fido2.hid import CtapHidDevice

    return list(CtapHidDevice.list_devices())


def authenticate_with_key(
    say: Any, verifier: Verifier, user: str, context: Context, keys: list[Any], timeout: float = TOUCH_SECONDS
) -> Decision | None:
    """The core's decision on an assertion from the first attached key that holds one of the user's
    credentials, or None when there is no such key (or no touch in time): the caller then asks for a code."""
    from fido2.ctap import CtapError
    from fido2.ctap2.base import Ctap2

    request = verifier.fido_request(user)
    if request is None or not keys:
        return None
    rp_id, challenge, allowed, needs_uv = request
    say(TOUCH_PROMPT)
    for key in keys:
        event = threading.Event()
        cancel = threading.Timer(timeout, event.set)
        cancel.start()
        try:
            response = Ctap2(key).get_assertion(
                rp_id,
                fido2_key.client_data_hash(challenge, rp_id),
                [{"type": "public-key", "id": c} for c in allowed],
                options={"uv": True} if needs_uv else None,
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
