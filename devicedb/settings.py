"""Settings: mfaguard.yaml loaded once and validated into typed, frozen objects.

Every problem is reported as ``FILE:LINE: key.path: what is wrong; what is allowed``.
Unknown keys, wrong types and out-of-range values are errors, never ignored.
The documented defaults live here and in ``config/mfaguard.yaml``; a test keeps
the two in step.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from devicedb.errors import ConfigError, UnsafePathError
from devicedb.fsafety import read_trusted_file

DEFAULT_CONFIG_PATH = "/etc/mfaguard/mfaguard.yaml"
CONFIG_ENV = "MFAGUARD_CONFIG"

# NIST SP 800-63B: at most 100 consecutive failed attempts on one account.
HARD_LOCK_CEILING = 100
MAX_DEVICES_CEILING = 8
MAX_TOTP_WINDOW = 10


@dataclass(frozen=True)
class DatabaseSettings:
    path: str = "/var/lib/mfaguard/mfaguard.db"
    key_file: str = "/etc/mfaguard/seal.key"
    synchronous: str = "full"
    busy_timeout_ms: int = 5000


@dataclass(frozen=True)
class TotpSettings:
    period: int = 30
    digits: int = 6
    algorithm: str = "sha1"
    window: int = 1


@dataclass(frozen=True)
class LockoutSettings:
    max_failures: int = 5
    lock_seconds: int = 300
    hard_lock_after: int = 20


@dataclass(frozen=True)
class UsernameSettings:
    strip_realms: tuple[str, ...] = ()
    case_fold: bool = False


@dataclass(frozen=True)
class GraceSettings:
    until: dt.datetime | None = None
    users: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()


@dataclass(frozen=True)
class EnforcementSettings:
    exempt_users: tuple[str, ...] = ()
    exempt_groups: tuple[str, ...] = ()
    grace: GraceSettings = field(default_factory=GraceSettings)


@dataclass(frozen=True)
class LoggingSettings:
    file: str = "/var/log/mfaguard/mfaguard.log"


@dataclass(frozen=True)
class Settings:
    database: DatabaseSettings = field(default_factory=DatabaseSettings)
    issuer: str = "mfaguard"
    max_devices: int = 8
    totp: TotpSettings = field(default_factory=TotpSettings)
    lockout: LockoutSettings = field(default_factory=LockoutSettings)
    usernames: UsernameSettings = field(default_factory=UsernameSettings)
    enforcement: EnforcementSettings = field(default_factory=EnforcementSettings)
    logging: LoggingSettings = field(default_factory=LoggingSettings)
    # Where the settings came from: a path, or None for the built-in defaults.
    source: str | None = None


# ---------------------------------------------------------------------------
# Field specifications. Each checker returns the typed value or raises _Bad.


class _Bad(Exception):
    def __init__(self, problem: str, allowed: str) -> None:
        super().__init__(problem)
        self.problem = problem
        self.allowed = allowed


Checker = Callable[[Any], Any]


def _int_range(low: int, high: int) -> Checker:
    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Bad(f"{value!r} is not an integer", f"an integer from {low} to {high}")
        if not low <= value <= high:
            raise _Bad(f"{value} is out of range", f"an integer from {low} to {high}")
        return value

    return check


def _int_choice(*choices: int) -> Checker:
    allowed = " or ".join(str(c) for c in choices)

    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value not in choices:
            raise _Bad(f"{value!r} is not allowed", allowed)
        return value

    return check


def _str_choice(*choices: str) -> Checker:
    allowed = ", ".join(choices)

    def check(value: Any) -> str:
        if not isinstance(value, str) or value not in choices:
            raise _Bad(f"{value!r} is not allowed", f"one of {allowed}")
        return value

    return check


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _Bad(f"{value!r} is not a boolean", "true or false")
    return value


def _absolute_path(value: Any) -> str:
    if not isinstance(value, str) or not value.startswith("/") or "\0" in value:
        raise _Bad(f"{value!r} is not an absolute path", "an absolute path such as /var/lib/mfaguard/mfaguard.db")
    return os.path.normpath(value)


def _text(max_len: int) -> Checker:
    def check(value: Any) -> str:
        if not isinstance(value, str) or not value.strip():
            raise _Bad(f"{value!r} is not a non-empty string", f"a string of 1 to {max_len} printable characters")
        if len(value) > max_len or not value.isprintable():
            raise _Bad("the string is too long or holds control characters", f"1 to {max_len} printable characters")
        return value

    return check


def _name_list(what: str) -> Checker:
    def check(value: Any) -> tuple[str, ...]:
        if value is None:
            return ()
        if not isinstance(value, list):
            raise _Bad(f"{value!r} is not a list", f"a list of {what}, for example [alice, bob]")
        out = []
        for item in value:
            if not isinstance(item, str) or not item or not item.isprintable() or item != item.strip():
                raise _Bad(f"list item {item!r} is not a plain name", f"a list of {what} without spaces")
            out.append(item)
        return tuple(out)

    return check


def _instant_or_null(value: Any) -> dt.datetime | None:
    if value is None:
        return None
    if isinstance(value, dt.datetime):
        return value if value.tzinfo else value.replace(tzinfo=dt.UTC)
    if isinstance(value, dt.date):
        return dt.datetime(value.year, value.month, value.day, tzinfo=dt.UTC)
    raise _Bad(f"{value!r} is not a date", "null (off), a date such as 2027-01-31, or 2027-01-31T12:00:00Z")


@dataclass(frozen=True)
class _Field:
    checker: Checker
    doc: str


@dataclass(frozen=True)
class _Section:
    cls: type
    fields: Mapping[str, _Field | _Section]


_SPEC = _Section(
    Settings,
    {
        "database": _Section(
            DatabaseSettings,
            {
                "path": _Field(_absolute_path, "the SQLite database file"),
                "key_file": _Field(_absolute_path, "the 32-byte key that seals OTP seeds"),
                "synchronous": _Field(_str_choice("full", "normal"), "SQLite durability of each commit"),
                "busy_timeout_ms": _Field(_int_range(1, 5000), "how long to wait for a locked database"),
            },
        ),
        "issuer": _Field(_text(64), "the issuer name shown in authenticator apps"),
        "max_devices": _Field(_int_range(1, MAX_DEVICES_CEILING), "devices per user, all kinds together"),
        "totp": _Section(
            TotpSettings,
            {
                "period": _Field(_int_choice(30, 60), "seconds per step for new TOTP devices"),
                "digits": _Field(_int_choice(6, 8), "code length for new TOTP devices"),
                "algorithm": _Field(_str_choice("sha1", "sha256", "sha512"), "HMAC for new TOTP devices"),
                "window": _Field(_int_range(0, MAX_TOTP_WINDOW), "steps accepted either side of now"),
            },
        ),
        "lockout": _Section(
            LockoutSettings,
            {
                "max_failures": _Field(_int_range(1, HARD_LOCK_CEILING), "failures before a temporary lock"),
                "lock_seconds": _Field(_int_range(1, 86400), "length of a temporary lock"),
                "hard_lock_after": _Field(
                    _int_range(1, HARD_LOCK_CEILING), "consecutive failures before a lock only an admin lifts"
                ),
            },
        ),
        "usernames": _Section(
            UsernameSettings,
            {
                "strip_realms": _Field(_name_list("realm names"), "realms removed from alice@REALM and REALM\\alice"),
                "case_fold": _Field(_boolean, "fold login names to lower case"),
            },
        ),
        "enforcement": _Section(
            EnforcementSettings,
            {
                "exempt_users": _Field(_name_list("user names"), "users who need no second factor"),
                "exempt_groups": _Field(_name_list("group names"), "groups whose members need no second factor"),
                "grace": _Section(
                    GraceSettings,
                    {
                        "until": _Field(_instant_or_null, "end of the enrollment grace period, or null (off)"),
                        "users": _Field(_name_list("user names"), "users the grace rule covers"),
                        "groups": _Field(_name_list("group names"), "groups the grace rule covers"),
                    },
                ),
            },
        ),
        "logging": _Section(
            LoggingSettings,
            {"file": _Field(_absolute_path, "the daemon log file of the front ends")},
        ),
    },
)


# ---------------------------------------------------------------------------
# YAML walking with line numbers.


def _scalar_value(node: yaml.Node) -> Any:
    return yaml.SafeLoader("").construct_object(node, deep=True)


def _build(section: _Section, node: yaml.Node | None, path: str, src: str) -> Any:
    if node is None:
        return section.cls()
    if not isinstance(node, yaml.MappingNode):
        if isinstance(node, yaml.ScalarNode) and _scalar_value(node) is None:
            return section.cls()
        raise ConfigError(f"{src}:{node.start_mark.line + 1}: {path or 'top level'}: expected a mapping of keys")
    seen: dict[str, int] = {}
    values: dict[str, Any] = {}
    for key_node, value_node in node.value:
        line = key_node.start_mark.line + 1
        key = _scalar_value(key_node) if isinstance(key_node, yaml.ScalarNode) else None
        dotted = f"{path}.{key}" if path else str(key)
        if not isinstance(key, str) or key not in section.fields:
            known = ", ".join(section.fields)
            raise ConfigError(f"{src}:{line}: {dotted}: unknown key; allowed keys here: {known}")
        if key in seen:
            raise ConfigError(f"{src}:{line}: {dotted}: duplicate key (first at line {seen[key]})")
        seen[key] = line
        spec = section.fields[key]
        if isinstance(spec, _Section):
            values[key] = _build(spec, value_node, dotted, src)
            continue
        if not isinstance(value_node, yaml.ScalarNode | yaml.SequenceNode):
            raise ConfigError(f"{src}:{line}: {dotted}: expected a value, found a mapping; this key is {spec.doc}")
        try:
            values[key] = spec.checker(_scalar_value(value_node))
        except _Bad as bad:
            raise ConfigError(
                f"{src}:{value_node.start_mark.line + 1}: {dotted}: {bad.problem}; allowed: {bad.allowed}"
            ) from None
    try:
        return section.cls(**values)
    except TypeError as exc:  # pragma: no cover - the spec and the dataclasses disagree
        raise ConfigError(f"{src}: {path}: internal settings error: {exc}") from None


def _cross_checks(settings: Settings, src: str) -> None:
    lockout = settings.lockout
    if lockout.hard_lock_after < lockout.max_failures:
        raise ConfigError(
            f"{src}: lockout.hard_lock_after ({lockout.hard_lock_after}) is below lockout.max_failures "
            f"({lockout.max_failures}); allowed: hard_lock_after >= max_failures"
        )
    grace = settings.enforcement.grace
    if grace.until is not None and not (grace.users or grace.groups):
        raise ConfigError(
            f"{src}: enforcement.grace.until is set but grace.users and grace.groups are both empty; "
            "name who the grace rule covers, or set until: null"
        )
    if os.path.abspath(settings.database.path) == os.path.abspath(settings.database.key_file):
        raise ConfigError(f"{src}: database.path and database.key_file must be different files")


def parse_settings(text: str, source: str = "<string>") -> Settings:
    """Validate YAML text into Settings. Raises ConfigError naming the line and key."""
    try:
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
                line = event.start_mark.line + 1 if event.start_mark is not None else "?"
                raise ConfigError(f"{source}:{line}: YAML anchors and aliases are not allowed here")
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark is not None else source
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{where}: not valid YAML: {problem}") from None
    settings: Settings = _build(_SPEC, root, "", source)
    settings = _replace_source(settings, source)
    _cross_checks(settings, source)
    return settings


def _replace_source(settings: Settings, source: str | None) -> Settings:
    from dataclasses import replace

    return replace(settings, source=source)


def config_path(explicit: str | None = None, environ: Mapping[str, str] | None = None) -> tuple[str, bool]:
    """The settings path to use, and whether the administrator named it (flag or environment)."""
    env = os.environ if environ is None else environ
    if explicit:
        return explicit, True
    if env.get(CONFIG_ENV):
        return env[CONFIG_ENV], True
    return DEFAULT_CONFIG_PATH, False


def load_settings(
    path: str | None = None, *, require_file: bool = False, environ: Mapping[str, str] | None = None
) -> Settings:
    """Load settings from ``path``, ``$MFAGUARD_CONFIG`` or the default path.

    A file the administrator named must exist. The default path may be absent, and the
    built-in defaults then apply, unless ``require_file`` (the daemons and the PAM module).
    """
    chosen, named = config_path(path, environ)
    try:
        raw = read_trusted_file(chosen, "config file")
    except FileNotFoundError:
        if named or require_file:
            raise ConfigError(
                f"{chosen}: config file not found; create it from config/mfaguard.yaml "
                "(mode 0644 or stricter, owned by root)"
            ) from None
        return Settings()
    except UnsafePathError:
        raise
    except OSError as exc:
        raise ConfigError(f"{chosen}: cannot read the config file: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{chosen}: not valid UTF-8 (byte {exc.start}); save the file as UTF-8") from None
    return parse_settings(text, chosen)


def settings_as_dict(settings: Settings) -> dict[str, Any]:
    """Settings as plain data, for `mfa-admin` output and for tests."""
    from dataclasses import asdict

    data = asdict(settings)
    data.pop("source", None)
    return data
