"""~/.google_authenticator files, as google-authenticator-libpam writes them.

Line 1 is the base32 secret. Option lines start with ``"``: TOTP_AUTH, HOTP_COUNTER n,
STEP_SIZE s, WINDOW_SIZE w, DISALLOW_REUSE, RATE_LIMIT n s. The remaining lines are
8-digit scratch codes.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass, field

from devicedb.errors import InvalidInput

MAX_BYTES = 4096
_SCRATCH = re.compile(r"[0-9]{8}", re.ASCII)


@dataclass(frozen=True)
class GoogleAuthenticatorFile:
    secret: bytes = field(repr=False)
    kind: str  # "totp" or "hotp"
    counter: int | None
    step: int
    window: int | None
    disallow_reuse: bool
    rate_limit: tuple[int, int] | None
    scratch_codes: tuple[str, ...] = field(repr=False)
    unknown_options: tuple[str, ...]
    # The TOTP steps DISALLOW_REUSE lists as used: they stay used after the migration.
    used_steps: tuple[int, ...] = ()

    @property
    def weak(self) -> bool:
        return len(self.secret) < 16


def parse(data: bytes, where: str) -> GoogleAuthenticatorFile:
    if len(data) > MAX_BYTES:
        raise InvalidInput(f"{where}: larger than {MAX_BYTES} bytes; not a google-authenticator file")
    try:
        lines = data.decode("ascii").splitlines()
    except UnicodeDecodeError:
        raise InvalidInput(f"{where}: not ASCII text; not a google-authenticator file") from None
    if not lines or not lines[0].strip():
        raise InvalidInput(f"{where}: line 1 should hold the base32 secret")
    text = lines[0].strip().upper()
    try:
        secret = base64.b32decode(text + "=" * (-len(text) % 8))
    except (binascii.Error, ValueError):
        raise InvalidInput(f"{where}: line 1 is not a base32 secret") from None
    if len(secret) < 10:
        raise InvalidInput(f"{where}: the secret is {len(secret) * 8} bits; at least 80 are needed")
    kind, counter, step, window = "totp", None, 30, None
    disallow, rate, scratch, unknown = False, None, [], []
    used: list[int] = []
    for number, raw in enumerate(lines[1:], start=2):
        line = raw.strip()
        if not line:
            continue
        if line.startswith('"'):
            words = line[1:].split()
            name, args = (words[0], words[1:]) if words else ("", [])
            try:
                if name == "TOTP_AUTH":
                    kind = "totp"
                elif name == "HOTP_COUNTER":
                    kind, counter = "hotp", int(args[0])
                elif name == "STEP_SIZE":
                    step = int(args[0])
                elif name == "WINDOW_SIZE":
                    window = int(args[0])
                elif name == "DISALLOW_REUSE":
                    disallow = True
                    used += [int(a) for a in args if a.isascii() and a.isdigit()]
                elif name == "RATE_LIMIT":
                    rate = (int(args[0]), int(args[1]))
                else:
                    unknown.append(name)
            except (IndexError, ValueError):
                raise InvalidInput(f"{where}: line {number}: option {name} has a bad value") from None
        elif _SCRATCH.fullmatch(line):
            scratch.append(line)
        else:
            raise InvalidInput(f"{where}: line {number} is neither an option nor an 8-digit scratch code")
    if kind == "hotp" and (counter is None or counter < 0):
        raise InvalidInput(f"{where}: HOTP_COUNTER must be a whole number from 0 to 2^63-1")
    if kind == "hotp" and counter is not None and counter >= 2**63:
        raise InvalidInput(f"{where}: HOTP_COUNTER must be a whole number from 0 to 2^63-1")
    if window is not None and not 1 <= window <= 10_000:
        raise InvalidInput(f"{where}: WINDOW_SIZE {window} is out of range (1 to 10000)")
    if any(not 0 <= s < 2**63 for s in used):
        raise InvalidInput(f"{where}: DISALLOW_REUSE lists a step out of range")
    if not any(secret):
        raise InvalidInput(f"{where}: the secret is all zero bytes; that is no secret")
    return GoogleAuthenticatorFile(
        secret, kind, counter, step, window, disallow, rate, tuple(scratch), tuple(unknown), tuple(used)
    )
