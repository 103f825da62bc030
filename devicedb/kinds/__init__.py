"""Device kinds. Each kind is one module with the same small interface:

- ``FINGERPRINT_DOMAIN``: the namespace its secrets share for duplicate detection;
- ``code_lengths(device)``: which typed lengths the device could accept;
- ``match(device, secret, code, now, window)``: None, or a Match saying how the
  device's replay state advances (or that the code is a replay).

Modules are imported on first use, so a login pays only for the kinds it needs.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType

from devicedb.models import Advance

_MODULES = {
    "totp": "devicedb.kinds.totp",
    "hotp": "devicedb.kinds.hotp",
    "yubico": "devicedb.kinds.yubico",
    "ssh-sk": "devicedb.kinds.ssh_sk",
    "fido2": "devicedb.kinds.fido2_key",
}

KIND_NAMES = tuple(_MODULES)


@dataclass(frozen=True)
class Match:
    """What a code did to a device: an ``advance`` when it is accepted (subject to the
    conditional UPDATE), ``replay`` when it is an old one, or a ``note`` of state that a
    failed attempt leaves behind (an HOTP code beyond the look-ahead, kept for a resync)."""

    advance: Advance | None
    replay: bool = False
    # Steps or counters between the expected position and the matched one, for the audit row.
    offset: int = 0
    note: dict[str, int | float | None] | None = None


_LOADED: dict[str, ModuleType] = {}


def get_kind(name: str) -> ModuleType | None:
    loaded = _LOADED.get(name)
    if loaded is not None:
        return loaded
    module = _MODULES.get(name)
    if module is None:
        return None
    loaded = _LOADED[name] = importlib.import_module(module)
    return loaded


def is_digit_code(code: str, length: int) -> bool:
    """An exact ASCII digit string of the given length: no sign, no spaces, no fullwidth digits."""
    return len(code) == length and code.isascii() and code.isdigit()
