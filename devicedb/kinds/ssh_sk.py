"""OpenSSH security keys (sk-ssh-ed25519@openssh.com, sk-ecdsa-sha2-nistp256@openssh.com).

sshd verifies the key's signature, and its touch and PIN as the authorized_keys line that
matched asks; mfaguard owns which keys are allowed (served to sshd through
AuthorizedKeysCommand), the device limit and the audit. When sshd's SSH_AUTH_INFO_0 names a
publickey login with one of the user's enabled keys, the PAM auth phase counts the FIDO factor
as done, unless the user's own authorized_keys files hold the same key with weaker options
(sshd may have matched that line instead) or could not be checked. Such a device takes no code.

Public key blobs are parsed strictly, as PROTOCOL.u2f lays them out (SSH strings, RFC 4251):

    sk-ecdsa-sha2-nistp256@openssh.com: string type, string "nistp256", string Q, string application
    sk-ssh-ed25519@openssh.com:         string type, string key (32 bytes), string application

with no trailing bytes, Q an uncompressed point on P-256 (checked with ``cryptography``), and
the application starting with ``ssh:`` (ssh-keygen refuses to enroll any other). The stored
blob, and the fingerprint that catches a key enrolled twice, are the canonical re-encoding.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import re
import struct
from dataclasses import dataclass

from devicedb.errors import InvalidInput
from devicedb.kinds import Match
from devicedb.models import Device

KIND = "ssh-sk"
FINGERPRINT_DOMAIN = "ssh-sk"
ECDSA = "sk-ecdsa-sha2-nistp256@openssh.com"
ED25519 = "sk-ssh-ed25519@openssh.com"
KEY_TYPES = (ED25519, ECDSA)
ECDSA_CURVE = b"nistp256"
ED25519_KEY_BYTES = 32
P256_POINT_BYTES = 65  # 0x04 || X || Y: the uncompressed point OpenSSH writes and reads
APPLICATION_PREFIX = "ssh:"
MAX_APPLICATION_BYTES = 255
# Options that keep their meaning when sshd gets the key from AuthorizedKeysCommand.
KNOWN_OPTIONS = ("no-touch-required", "verify-required")
MAX_LINE = 8192


@dataclass(frozen=True)
class PublicKey:
    key_type: str
    blob_b64: str
    options: tuple[str, ...]
    comment: str

    @property
    def blob(self) -> bytes:
        return base64.b64decode(self.blob_b64)

    def authorized_keys_line(self) -> str:
        prefix = ",".join(self.options) + " " if self.options else ""
        return f"{prefix}{self.key_type} {self.blob_b64}"


def _ssh_string(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def _fields(blob: bytes) -> list[bytes]:
    """The SSH strings a blob is made of; every byte must belong to one."""
    out = []
    at = 0
    while at < len(blob):
        if len(blob) - at < 4:
            raise InvalidInput(f"the key data ends inside a length field ({len(blob) - at} stray bytes)")
        length = int.from_bytes(blob[at : at + 4], "big")
        at += 4
        if length > len(blob) - at:
            raise InvalidInput("the key data is cut short: a field is longer than what follows it")
        out.append(blob[at : at + length])
        at += length
    return out


def canonical_blob(key_type: str, blob: bytes) -> bytes:
    """The blob re-encoded from its checked fields, or InvalidInput naming what is wrong."""
    fields = _fields(blob)
    if not fields or fields[0] != key_type.encode():
        raise InvalidInput("the key data does not hold a key of the type the line names")
    expected = 4 if key_type == ECDSA else 3
    if len(fields) != expected:
        raise InvalidInput(
            f"the key data holds {len(fields)} fields; a {key_type} public key has exactly {expected} "
            "(trailing or missing data)"
        )
    if key_type == ECDSA:
        _, curve, point, application = fields
        if curve != ECDSA_CURVE:
            raise InvalidInput(f"the key's curve is {curve!r}; a {ECDSA} key is on nistp256")
        _check_p256_point(point)
        body = [curve, point]
    else:
        _, key, application = fields
        if len(key) != ED25519_KEY_BYTES:
            raise InvalidInput(f"the Ed25519 key is {len(key)} bytes; it must be exactly {ED25519_KEY_BYTES}")
        body = [key]
    _check_application(application)
    return b"".join(_ssh_string(f) for f in [key_type.encode(), *body, application])


def _check_p256_point(point: bytes) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec

    if len(point) != P256_POINT_BYTES or point[0] != 0x04:
        raise InvalidInput(
            f"the ECDSA point is not an uncompressed P-256 point (04 and 64 bytes; got {len(point)} bytes)"
        )
    try:
        ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)
    except ValueError:
        raise InvalidInput("the ECDSA point is not on the P-256 curve") from None


def _check_application(application: bytes) -> None:
    try:
        text = application.decode("utf-8", errors="strict")
    except UnicodeDecodeError:
        raise InvalidInput("the key's application is not UTF-8") from None
    if not text.startswith(APPLICATION_PREFIX) or len(application) > MAX_APPLICATION_BYTES or not text.isprintable():
        raise InvalidInput(
            f"the key's application {text!r} is not accepted; OpenSSH's rule: it starts with 'ssh:' "
            f"(such as 'ssh:' or 'ssh:work'), printable, at most {MAX_APPLICATION_BYTES} bytes"
        )


def parse_public_key(line: str) -> PublicKey:
    """A .pub or authorized_keys line: ``[options] TYPE BASE64 [comment]``; only sk- types."""
    text = line.strip()
    if not text or len(text) > MAX_LINE or "\n" in text or not text.isprintable():
        raise InvalidInput("not a single line of an OpenSSH public key")
    words = text.split()
    options: tuple[str, ...] = ()
    if words[0] not in KEY_TYPES and len(words) > 1 and words[1] in KEY_TYPES:
        options = tuple(o for o in words[0].split(",") if o)
        words = words[1:]
    if words[0] not in KEY_TYPES:
        raise InvalidInput(
            f"key type {words[0]!r} is not a security key; accepted: {', '.join(KEY_TYPES)} "
            "(make one with ssh-keygen -t ed25519-sk)"
        )
    unknown = [o for o in options if o not in KNOWN_OPTIONS]
    if unknown:
        raise InvalidInput(f"option(s) {', '.join(unknown)} are not accepted; allowed: {', '.join(KNOWN_OPTIONS)}")
    if len(words) < 2:
        raise InvalidInput("the key line has no key data")
    try:
        blob = base64.b64decode(words[1], validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInput("the key data is not base64") from None
    canonical = canonical_blob(words[0], blob)
    return PublicKey(words[0], base64.b64encode(canonical).decode(), options, " ".join(words[2:])[:128])


def from_device(device: Device) -> PublicKey:
    params = device.params
    return PublicKey(
        str(params["key_type"]),
        str(params["public_key"]),
        tuple(params.get("options", ())),
        str(params.get("comment", "")),
    )


def used_keys(auth_info: str) -> list[tuple[str, str]]:
    """(type, base64) of every security key SSH_AUTH_INFO_0 says this login used."""
    out = []
    for line in auth_info.splitlines():
        words = line.split()
        if len(words) >= 3 and words[0] == "publickey" and words[1] in KEY_TYPES:
            out.append((words[1], words[2]))
    return out


def _decode(b64: str) -> bytes | None:
    try:
        return base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        return None


def matches_login(device: Device, auth_info: str) -> bool:
    key = from_device(device)
    mine = _decode(key.blob_b64)
    if mine is None:
        return False
    for kind, b64 in used_keys(auth_info):
        theirs = _decode(b64)
        if kind == key.key_type and theirs is not None and hmac.compare_digest(theirs, mine):
            return True
    return False


# -- the user's own authorized_keys files ------------------------------------------------------------


@dataclass(frozen=True)
class UserKeyFiles:
    """What a front end read of the user's own authorized_keys files, for ``user_files_weaken``:
    the (path, bytes) of each that exists, or ``problem`` when one could not be read safely (a
    symlink, not a regular file, too large, unreadable): then nothing can be told."""

    files: tuple[tuple[str, bytes], ...] = ()
    problem: str | None = None


_SPACE = re.compile(rb"[ \t]+")  # sshd separates an authorized_keys line's fields with spaces and tabs
_ANY_WHITESPACE = re.compile(rb"\s+")


def _lenient_b64(token: bytes) -> bytes | None:
    """The bytes a token could stand for: sshd's decoder skips white space inside it; padding and
    trailing bits are forgiven here (a looser reading can only find more copies of the key)."""
    data = _ANY_WHITESPACE.sub(b"", token).rstrip(b"=")
    try:
        return base64.b64decode(data + b"=" * (-len(data) % 4), validate=True)
    except (binascii.Error, ValueError):
        return None


def _split_options(line: bytes) -> tuple[bytes, bytes] | None:
    """(options, rest) as sshd's sshkey_advance_past_options reads them: up to the first space or
    tab outside double quotes (\\" is a quote inside them). None for an unterminated quote."""
    quoted = False
    at = 0
    while at < len(line) and (quoted or line[at] not in b" \t"):
        if line[at : at + 2] == b'\\"':
            at += 1
        elif line[at : at + 1] == b'"':
            quoted = not quoted
        at += 1
    if quoted:
        return None
    return line[:at], line[at:].lstrip(b" \t")


def _option_names(options: bytes) -> list[str]:
    """The option names (lower case, as sshd compares them) of a comma-separated options field."""
    names = []
    quoted = False
    start = 0
    for at in range(len(options) + 1):
        ch = options[at : at + 1]
        if at == len(options) or (ch == b"," and not quoted):
            names.append(options[start:at].split(b"=", 1)[0].decode("latin-1").lower())
            start = at + 1
        elif ch == b'"' and options[at - 1 : at] != b"\\":
            quoted = not quoted
    return names


def _touch_and_verify(option_names: list[str]) -> tuple[bool, bool]:
    """Whether a line with these options makes sshd require the touch, and the PIN (sshd's
    auth-options.c: touch-required and verify-required, each also negated with no-; last wins)."""
    touch, verify = True, False
    for name in option_names:
        if name in ("touch-required", "no-touch-required"):
            touch = name == "touch-required"
        elif name in ("verify-required", "no-verify-required"):
            verify = name == "verify-required"
    return touch, verify


def _line_key(line: bytes) -> tuple[bytes, str, bytes | None] | None:
    """(options, key type, blob) of an authorized_keys line as sshd reads it, or None if unreadable."""
    words = _SPACE.split(line)
    if len(words) >= 2 and words[0].decode("latin-1") in KEY_TYPES:
        return b"", words[0].decode("latin-1"), _lenient_b64(words[1])
    split = _split_options(line)
    if split is None:
        return None
    options, rest = split
    words = _SPACE.split(rest)
    if len(words) < 2:
        return None
    return options, words[0].decode("latin-1"), _lenient_b64(words[1])


def user_files_weaken(device: Device, found: UserKeyFiles | None) -> str | None:
    """Why the user's own authorized_keys files stop this enrolled key from counting, or None.

    sshd reads those files as well as mfaguard's AuthorizedKeysCommand and applies the options
    of the line it matched. So a line with the same key blob whose options are weaker than the
    enrolled ones (no touch where touch was enrolled, no verify-required where it was) means sshd
    may not have asked for the touch or the PIN; a line holding the blob that cannot be read as
    sshd would read it, or files that could not be read safely, mean that this cannot be told."""
    if found is None:
        return "the user's own authorized_keys files were not checked"
    if found.problem is not None:
        return f"the user's own authorized_keys cannot be checked ({found.problem})"
    key = from_device(device)
    blob = _decode(key.blob_b64)
    if blob is None:
        return "the enrolled key's data is damaged"
    touch = "no-touch-required" not in key.options
    verify = "verify-required" in key.options
    for path, data in found.files:
        for number, raw in enumerate(data.split(b"\n"), 1):
            line = raw.lstrip(b" \t").rstrip(b"\r")
            if not line or line.startswith(b"#"):
                continue
            if not any(_lenient_b64(word) == blob for word in _SPACE.split(line)):
                continue
            parsed = _line_key(line)
            if parsed is None or parsed[1] != key.key_type:
                return f"{path} line {number} holds the enrolled key in a form that cannot be checked"
            options, _type, line_blob = parsed
            if line_blob != blob:
                continue  # the key is in another field (a comment, say), not the one sshd reads
            line_touch, line_verify = _touch_and_verify(_option_names(options) if options else [])
            weaker = []
            if touch and not line_touch:
                weaker.append("no touch required")
            if verify and not line_verify:
                weaker.append("no verify-required")
            if weaker:
                return f"{path} line {number} holds the same key with weaker options ({', '.join(weaker)})"
    return None


def code_lengths(device: Device) -> set[int]:
    return set()  # a security key takes no typed code


def match(device: Device, secret: bytes, code: str, now: float, window: int) -> Match | None:
    return None
