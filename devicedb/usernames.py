"""The one place a login name becomes its canonical form.

PAM, RADIUS, lockout and audit all key on the result. The mapping:

1. Bytes are decoded as strict UTF-8; invalid UTF-8 is refused.
2. Empty names, names over 256 characters, names with leading or trailing
   whitespace and names holding any control or format character (C0, C1, DEL,
   zero-width and direction marks: Unicode categories Cc, Cf, Zl, Zp) are refused.
3. A configured realm is stripped: ``alice@CORP`` (last ``@``) and
   ``CORP\\alice`` (first backslash) both become ``alice`` when CORP is listed
   in ``usernames.strip_realms``. Realms compare case-insensitively. A realm
   that is not listed is kept, so ``alice@OTHER`` stays a different user. A name
   with a second configured realm (``alice@CORP@CORP``) is refused, so the
   mapping is idempotent: a canonical name maps to itself.
4. With ``usernames.case_fold`` the name is folded to lower case.
"""

from __future__ import annotations

import re
import unicodedata

from devicedb.errors import InvalidUserName
from devicedb.settings import UsernameSettings

MAX_NAME_CHARS = 256
_REFUSED_CATEGORIES = {"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"}


def _check_chars(name: str) -> None:
    if not name:
        raise InvalidUserName("user name is empty")
    if len(name) > MAX_NAME_CHARS:
        raise InvalidUserName(f"user name is longer than {MAX_NAME_CHARS} characters")
    if name != name.strip():
        raise InvalidUserName("user name has leading or trailing whitespace")
    for ch in name:
        if unicodedata.category(ch) in _REFUSED_CATEGORIES:
            raise InvalidUserName(f"user name holds a control or format character (U+{ord(ch):04X})")


def _strip_realm(name: str, realms: set[str]) -> str:
    if "\\" in name:
        realm, _, rest = name.partition("\\")
        if realm.casefold() in realms:
            return rest
    elif "@" in name:
        rest, _, realm = name.rpartition("@")
        if realm.casefold() in realms:
            return rest
    return name


def canonical_user(raw: str | bytes, rules: UsernameSettings) -> str:
    if isinstance(raw, bytes):
        try:
            name = raw.decode("utf-8", errors="strict")
        except UnicodeDecodeError:
            raise InvalidUserName("user name is not valid UTF-8") from None
    elif isinstance(raw, str):
        name = raw
    else:
        raise InvalidUserName(f"user name must be text, not {type(raw).__name__}")
    try:
        name.encode("utf-8", errors="strict")
    except UnicodeEncodeError:
        raise InvalidUserName("user name holds an unpaired surrogate (not valid UTF-8)") from None
    _check_chars(name)
    realms = {r.casefold() for r in rules.strip_realms}
    if realms:
        name = _strip_realm(name, realms)
        _check_chars(name)
        if _strip_realm(name, realms) != name:
            # alice@CORP@CORP or CORP\alice@CORP: strip once only and the result would not be
            # canonical (stripping it again would change it), so refuse it outright.
            raise InvalidUserName("user name carries more than one realm")
    if rules.case_fold:
        name = name.lower()
    return name


_CODE_LIKE = re.compile(r"[0-9 -]{6,}", re.ASCII)


def is_code_like(name: str) -> bool:
    """A name that is nothing but digits (and spaces or dashes): most likely a code typed at the wrong prompt."""
    return _CODE_LIKE.fullmatch("".join(ch for ch in name if ch.isprintable())) is not None


def audit_name(user: str, *, known: bool) -> str:
    """The name an audit row records. A code-like name with no device is masked: it is far more
    likely a code typed at the user-name prompt than an account, and codes never reach the log."""
    if not known and is_code_like(user):
        return "#" * min(len(user), 64) + " (a code-like name, masked)"
    return user


def safe_display(raw: object, limit: int = 64) -> str:
    """A printable rendering of a name that was refused, for logs and audit rows.

    A name that is nothing but digits (with spaces or dashes), control characters aside,
    is masked: that is a code typed at the user-name prompt, and it must not reach the
    audit log through the name.
    """
    text = raw.decode("utf-8", errors="backslashreplace") if isinstance(raw, bytes) else str(raw)
    if is_code_like(text):
        return "#" * min(len(text), limit) + " (a code-like name, masked)"
    shown = "".join(ch if ch.isprintable() and not ch.isspace() or ch == " " else f"\\x{ord(ch):02x}" for ch in text)
    return shown[:limit] + ("…" if len(shown) > limit else "")
