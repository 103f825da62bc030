"""The first factor: a password checked by a PAM service through python-pam.

A PAM stack that loads pam_python must never be called from inside this process (two
libpython copies crash it), so such a stack is refused when the server starts or reloads.
"""

from __future__ import annotations

import logging
import os

from devicedb.errors import ConfigError

log = logging.getLogger("mfa-radiusd")

PAM_DIR = "/etc/pam.d"
_MAX_DEPTH = 8


def _stack_modules(service: str, pam_dir: str, depth: int = 0, seen: set[str] | None = None) -> list[str]:
    """Every module a PAM service file loads, following @include, include and substack."""
    seen = set() if seen is None else seen
    if depth > _MAX_DEPTH or service in seen:
        return []
    seen.add(service)
    path = service if os.path.isabs(service) else os.path.join(pam_dir, service)
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            text = fh.read()
    except FileNotFoundError:
        if depth == 0:
            raise ConfigError(
                f"radius.first_factor: PAM service {service} has no file {path}; create it (for example "
                "with 'auth required pam_unix.so' and 'account required pam_unix.so') or set first_factor: none"
            ) from None
        # Linux-PAM fails the whole stack on a missing include: no password would ever pass.
        raise ConfigError(
            f"radius.first_factor: the PAM stack includes {service}, which has no file {path}; every first factor "
            "would fail. Create it or drop the include"
        ) from None
    except OSError as exc:
        raise ConfigError(f"radius.first_factor: cannot read {path}: {exc.strerror}") from None
    modules: list[str] = []
    for raw in text.replace("\\\n", " ").splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("@include"):
            parts = line.split()
            if len(parts) > 1:
                modules += _stack_modules(parts[1], pam_dir, depth + 1, seen)
            continue
        tokens = line.split()
        if len(tokens) < 3:
            continue
        rest = tokens[1:]
        if rest[0].startswith("["):
            # [value=action ...] controls may hold spaces.
            while rest and not rest[0].endswith("]"):
                rest = rest[1:]
            rest = rest[1:]
            control = "bracket"
        else:
            control = rest[0]
            rest = rest[1:]
        if not rest:
            continue
        module = rest[0].lstrip("-")
        if control in ("include", "substack"):
            modules += _stack_modules(module, pam_dir, depth + 1, seen)
        else:
            modules.append(module)
    return modules


_MODULE_DIRS = (
    "/lib/security",
    "/lib/x86_64-linux-gnu/security",
    "/usr/lib/x86_64-linux-gnu/security",
    "/lib/aarch64-linux-gnu/security",
    "/usr/lib/aarch64-linux-gnu/security",
)


def _module_paths(module: str) -> list[str]:
    """The module as named, and the file it really is (a symlink to pam_python.so under another name)."""
    candidates = [module] if os.path.isabs(module) else [os.path.join(d, module) for d in _MODULE_DIRS]
    return [module] + [os.path.realpath(c) for c in candidates if os.path.exists(c)]


def check_service(service: str, pam_dir: str = PAM_DIR) -> None:
    """Refuse a first-factor PAM service whose stack loads pam_python (or whose file is missing)."""
    for module in _stack_modules(service, pam_dir):
        if any("pam_python" in os.path.basename(path) for path in _module_paths(module)):
            raise ConfigError(
                f"radius.first_factor: PAM service {service} loads {module}; a stack with pam_python would crash "
                "mfa-radiusd (two Python interpreters in one process). Use a stack with pam_unix, pam_sss or pam_ldap"
            )


class FirstFactor:
    """Checks a user's password against a PAM service. ``service`` None means no first factor (otp-only)."""

    def __init__(self, service: str | None) -> None:
        self.service = service

    def check(self, user: str, password: str) -> bool:
        if self.service is None:
            return False  # never reached: first_factor none is allowed only with otp-only clients
        try:
            import pam

            handle = pam.pam()
            ok = bool(handle.authenticate(user, password, service=self.service, resetcreds=False))
            if not ok:
                log.info("first factor (PAM %s) refused user %s: %s", self.service, user, handle.reason)
            return ok
        except Exception as exc:
            log.error("first factor (PAM %s) failed for %s: %s", self.service, user, type(exc).__name__)
            return False
