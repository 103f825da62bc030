"""Who must present a second factor: everybody, root included, but for the exceptions named.

Group membership is read from the system's group database (NSS). A lookup that
fails counts as "not a member": an error never exempts anyone.
"""

from __future__ import annotations

import datetime as dt
import grp
import pwd
from collections.abc import Iterable

from devicedb.errors import InvalidUserName
from devicedb.settings import EnforcementSettings, UsernameSettings
from devicedb.usernames import canonical_user


def _canonical_names(names: Iterable[str], rules: UsernameSettings) -> set[str]:
    out = set()
    for name in names:
        try:
            out.add(canonical_user(name, rules))
        except InvalidUserName:
            continue  # a name that cannot be canonical matches nobody
    return out


def in_any_group(user: str, groups: Iterable[str]) -> bool:
    wanted = set(groups)
    if not wanted:
        return False
    try:
        primary_gid = pwd.getpwnam(user).pw_gid
    except (KeyError, OSError):
        primary_gid = None
    for name in wanted:
        try:
            group = grp.getgrnam(name)
        except (KeyError, OSError):
            continue
        if user in group.gr_mem or (primary_gid is not None and group.gr_gid == primary_gid):
            return True
    return False


def is_exempt(user: str, rules: EnforcementSettings, names: UsernameSettings) -> str | None:
    """The reason the user is exempt, or None."""
    if user in _canonical_names(rules.exempt_users, names):
        return "listed in enforcement.exempt_users"
    if in_any_group(user, rules.exempt_groups):
        return "member of a group in enforcement.exempt_groups"
    return None


def grace_applies(user: str, rules: EnforcementSettings, names: UsernameSettings, now: float) -> str | None:
    """The reason the grace rule covers this user now, or None. The caller checks 'no device at all'."""
    grace = rules.grace
    if grace.until is None:
        return None
    if now >= grace.until.timestamp():
        return None
    if user in _canonical_names(grace.users, names):
        return f"enrollment grace until {grace.until.isoformat()} (enforcement.grace.users)"
    if in_any_group(user, grace.groups):
        return f"enrollment grace until {grace.until.isoformat()} (enforcement.grace.groups)"
    return None


def utc_iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="seconds")
