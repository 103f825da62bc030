"""MFA coverage of the passwd database: the 100 % check.

An account is login-capable when its shell is listed in /etc/shells (the list
chsh and many daemons use) and is not nologin or false; root always counts.
"""

from __future__ import annotations

import os
import pwd
from typing import Any

from devicedb.errors import InvalidUserName
from devicedb.manage import DeviceManager
from devicedb.models import Requirement
from devicedb.store import Store

_NO_LOGIN = {"nologin", "false"}


def valid_shells(path: str = "/etc/shells") -> set[str]:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return {line.strip() for line in f if line.strip() and not line.startswith("#")}
    except OSError:
        return set()


def login_capable(entry: pwd.struct_passwd, shells: set[str]) -> bool:
    if entry.pw_uid == 0:
        return True
    shell = entry.pw_shell
    return bool(shell) and shell in shells and os.path.basename(shell) not in _NO_LOGIN


def coverage(store: Store) -> dict[str, Any]:
    manager = DeviceManager(store)
    shells = valid_shells()
    entries = sorted(
        (e for e in pwd.getpwall() if login_capable(e, shells)),
        key=lambda e: (e.pw_uid != 0, e.pw_name != "root", e.pw_uid, e.pw_name),
    )
    accounts = []
    seen = set()
    for entry in entries:
        try:
            status = manager.status(entry.pw_name)
        except InvalidUserName as exc:
            accounts.append(
                {
                    "user": entry.pw_name,
                    "uid": entry.pw_uid,
                    "shell": entry.pw_shell,
                    "status": "invalid-name",
                    "active_devices": 0,
                    "devices": 0,
                    "note": str(exc),
                }
            )
            continue
        if status.user in seen:
            continue
        seen.add(status.user)
        active = sum(1 for d in status.devices if d.usable)
        if status.requirement is Requirement.EXEMPT:
            state, note = "exempt", status.requirement_reason
        elif active:
            state, note = "covered", ""
        elif status.requirement is Requirement.GRACE:
            state, note = "grace", status.requirement_reason
        elif status.devices:
            state, note = "uncovered", "devices exist but none is active"
        else:
            state, note = "uncovered", "no device enrolled"
        if status.locked_now:
            note = (note + "; " if note else "") + "locked"
        weak = [d.id for d in status.devices if d.usable and d.params.get("weak")]
        if weak:
            note = (note + "; " if note else "") + f"WEAK secret on device(s) {', '.join(map(str, weak))}"
        accounts.append(
            {
                "user": status.user,
                "uid": entry.pw_uid,
                "shell": entry.pw_shell,
                "status": state,
                "active_devices": active,
                "devices": len(status.devices),
                "note": note,
                "weak_devices": weak,
            }
        )
    uncovered = [a["user"] for a in accounts if a["status"] not in ("covered", "exempt")]
    return {
        "accounts": accounts,
        "total": len(accounts),
        "covered": sum(1 for a in accounts if a["status"] == "covered"),
        "exempt": sum(1 for a in accounts if a["status"] == "exempt"),
        "uncovered": uncovered,
    }
