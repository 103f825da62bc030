"""HOTP hardware tokens (RFC 4226): a counter that moves forward only.

The device stores the next expected counter. A code is checked against counters
next … next+look_ahead-1, never below next; a match at c moves next to c+1 with the
store's conditional UPDATE. A code further ahead, within the resync window, is
remembered; when the very next code the user types is the one for the following
counter, the token is re-synchronised. Codes below next are replays.
"""

from __future__ import annotations

import hmac
from typing import Any

from devicedb.errors import InvalidInput
from devicedb.kinds import Match, is_digit_code
from devicedb.kinds.totp import ALGORITHMS, codes, otp
from devicedb.models import Advance, Device

KIND = "hotp"
FINGERPRINT_DOMAIN = "oath"  # the same secret as a TOTP device is the same token
DIGITS = (6, 8)
DEFAULT_LOOK_AHEAD = 10
DEFAULT_RESYNC_WINDOW = 100
MAX_LOOK_AHEAD = 50
MAX_RESYNC_WINDOW = 1000
# How long a code beyond the look-ahead waits for its successor.
RESYNC_SECONDS = 300
# How far an administrator's `devices resync` looks ahead.
ADMIN_RESYNC_WINDOW = 10_000
_CLEAR = {"resync_counter": None, "resync_at": None}


def validate_params(digits: int, algorithm: str, counter: int, look_ahead: int, resync_window: int) -> None:
    if digits not in DIGITS:
        raise InvalidInput(f"--digits {digits} is not allowed; use 6 or 8")
    if algorithm not in ALGORITHMS:
        raise InvalidInput(f"--algorithm {algorithm!r} is not allowed; use sha1, sha256 or sha512")
    if not 0 <= counter < 2**63:
        raise InvalidInput(f"--counter {counter} is not allowed; use a counter from 0 to 2^63-1")
    if not 1 <= look_ahead <= MAX_LOOK_AHEAD:
        raise InvalidInput(f"--look-ahead {look_ahead} is not allowed; use 1 to {MAX_LOOK_AHEAD}")
    if not look_ahead <= resync_window <= MAX_RESYNC_WINDOW:
        raise InvalidInput(f"--resync-window {resync_window} is not allowed; use {look_ahead} to {MAX_RESYNC_WINDOW}")


def code_at(secret: bytes, digits: int, algorithm: str, counter: int) -> str:
    return str(otp(secret, digits, algorithm).generate_otp(counter))


def code_lengths(device: Device) -> set[int]:
    return {device.digits or 6}


def _matching(generator: Any, wanted: bytes, start: int, stop: int) -> list[int]:
    # Every candidate is computed and compared, matched or not.
    return [
        c for c in range(max(0, start), stop) if hmac.compare_digest(generator.generate_otp(c).encode("ascii"), wanted)
    ]


def match(device: Device, secret: bytes, code: str, now: float, window: int) -> Match | None:
    """``window`` is the TOTP window and does not apply: HOTP has its own look-ahead."""
    digits = device.digits or 6
    algorithm = device.algorithm or "sha1"
    if not is_digit_code(code, digits) or algorithm not in ALGORITHMS:
        return None
    generator = codes(secret, digits, algorithm)
    wanted = code.encode("ascii")
    expected = device.next_counter or 0
    look_ahead = int(device.params.get("look_ahead", DEFAULT_LOOK_AHEAD))
    resync_window = int(device.params.get("resync_window", DEFAULT_RESYNC_WINDOW))
    ahead = _matching(generator, wanted, expected, expected + look_ahead)
    if ahead:
        counter = ahead[0]
        return Match(Advance("next_counter", counter + 1, dict(_CLEAR)), offset=counter - expected)
    if _matching(generator, wanted, expected - look_ahead, expected):
        return Match(None, replay=True)
    far = _matching(generator, wanted, expected + look_ahead, expected + resync_window)
    if not far:
        return None
    counter = far[0]
    waiting = device.resync_counter
    fresh = device.resync_at is not None and 0 <= now - device.resync_at <= RESYNC_SECONDS
    if waiting is not None and fresh and counter == waiting + 1:
        return Match(Advance("next_counter", counter + 1, dict(_CLEAR)), offset=counter - expected)
    return Match(None, note={"resync_counter": counter, "resync_at": now})


def find_consecutive(device: Device, secret: bytes, first: str, second: str) -> int | None:
    """The counter of ``second`` when it directly follows ``first``, ahead of the device (admin resync)."""
    digits = device.digits or 6
    algorithm = device.algorithm or "sha1"
    if not (is_digit_code(first, digits) and is_digit_code(second, digits)):
        return None
    generator = codes(secret, digits, algorithm)
    expected = device.next_counter or 0
    for counter in _matching(generator, first.encode("ascii"), expected, expected + ADMIN_RESYNC_WINDOW):
        if hmac.compare_digest(generator.generate_otp(counter + 1).encode("ascii"), second.encode("ascii")):
            return counter + 1
    return None


def describe(device: Device) -> dict[str, Any]:
    return {"digits": device.digits, "algorithm": device.algorithm, "next_counter": device.next_counter}
