"""Settings: strict validation with FILE:LINE: key errors, safe loading, defaults."""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from devicedb import settings as settings_module
from devicedb.errors import ConfigError, MfaguardError, UnsafePathError
from devicedb.settings import Settings, load_settings, parse_settings, settings_as_dict

if TYPE_CHECKING:
    from conftest import Lib

# An unsafe config file is refused as unsafe, or as a config problem naming the file.
REFUSED = (ConfigError, UnsafePathError)
EXAMPLE = Path(__file__).resolve().parent.parent / "config" / "mfaguard.yaml"


@pytest.fixture
def conf_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "etc"
    folder.mkdir(mode=0o700)
    os.chmod(folder, 0o700)
    return folder


def write_config(folder: Path, text: str | bytes, name: str = "mfaguard.yaml", mode: int = 0o644) -> Path:
    path = folder / name
    if isinstance(text, str):
        text = text.encode("utf-8")
    path.write_bytes(text)
    os.chmod(path, mode)
    return path


def load_error(path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        load_settings(str(path), environ={})
    return str(info.value)


# ---------------------------------------------------------------------------
# Errors name FILE:LINE: dotted.key.

BAD_CONFIGS = [
    # unknown keys
    pytest.param("issuer: acme\nfoo: 1\n", 2, "foo", "unknown key", id="unknown-top-level"),
    pytest.param(
        "lockout:\n  max_failures: 3\n  lock_secs: 5\n", 3, "lockout.lock_secs", "unknown key", id="unknown-nested"
    ),
    pytest.param(
        "enforcement:\n  grace:\n    user: [bob]\n", 3, "enforcement.grace.user", "unknown key", id="unknown-deep"
    ),
    pytest.param("# comment\n\nTotp:\n  window: 1\n", 3, "Totp", "unknown key", id="unknown-case-differs"),
    # wrong types
    pytest.param("max_devices: eight\n", 1, "max_devices", "not an integer", id="type-string-for-int"),
    pytest.param("max_devices: 8.0\n", 1, "max_devices", "not an integer", id="type-float-for-int"),
    pytest.param("max_devices: true\n", 1, "max_devices", "not an integer", id="type-bool-for-int"),
    pytest.param("totp:\n  window: '1'\n", 2, "totp.window", "not an integer", id="type-quoted-int"),
    pytest.param("usernames:\n  case_fold: 1\n", 2, "usernames.case_fold", "not a boolean", id="type-int-for-bool"),
    pytest.param(
        "usernames:\n  strip_realms: CORP\n", 2, "usernames.strip_realms", "not a list", id="type-str-for-list"
    ),
    pytest.param("issuer: [a]\n", 1, "issuer", "not a non-empty string", id="type-list-for-str"),
    pytest.param("lockout: 5\n", 1, "lockout", "mapping", id="type-scalar-for-section"),
    pytest.param("totp:\n  digits:\n    a: 1\n", 2, "totp.digits", "mapping", id="type-mapping-for-value"),
    pytest.param("database:\n  path: relative/db\n", 2, "database.path", "absolute path", id="type-relative-path"),
    pytest.param("totp:\n  algorithm: md5\n", 2, "totp.algorithm", "not allowed", id="choice-algorithm"),
    pytest.param("totp:\n  digits: 7\n", 2, "totp.digits", "not allowed", id="choice-digits"),
    # out of range
    pytest.param("max_devices: 0\n", 1, "max_devices", "out of range", id="range-max-devices-0"),
    pytest.param("max_devices: 9\n", 1, "max_devices", "out of range", id="range-max-devices-9"),
    pytest.param("max_devices: -1\n", 1, "max_devices", "out of range", id="range-max-devices-negative"),
    pytest.param(
        "lockout:\n  max_failures: 5\n  hard_lock_after: 101\n",
        3,
        "lockout.hard_lock_after",
        "out of range",
        id="range-hard-lock-101",
    ),
    pytest.param("lockout:\n  lock_seconds: 0\n", 2, "lockout.lock_seconds", "out of range", id="range-lock-seconds"),
    pytest.param("totp:\n  window: 11\n", 2, "totp.window", "out of range", id="range-window"),
    pytest.param(
        "database:\n  busy_timeout_ms: 5001\n", 2, "database.busy_timeout_ms", "out of range", id="range-busy"
    ),
    # duplicates
    pytest.param("issuer: a\nissuer: b\n", 2, "issuer", "duplicate key", id="duplicate-top-level"),
    pytest.param(
        "lockout:\n  max_failures: 3\n  max_failures: 4\n", 3, "lockout.max_failures", "duplicate", id="dup-nested"
    ),
    pytest.param(
        "totp:\n  window: 1\nissuer: x\ntotp:\n  window: 2\n", 4, "totp", "duplicate key", id="duplicate-section"
    ),
]


@pytest.mark.parametrize(("text", "line", "key", "problem"), BAD_CONFIGS)
def test_bad_values_name_file_line_and_key(conf_dir: Path, text: str, line: int, key: str, problem: str) -> None:
    path = write_config(conf_dir, text)
    message = load_error(path)
    assert message.startswith(f"{path}:{line}: {key}: "), message
    assert problem in message


def test_errors_say_what_is_allowed(conf_dir: Path) -> None:
    message = load_error(write_config(conf_dir, "max_devices: 9\n"))
    assert "from 1 to 8" in message
    message = load_error(write_config(conf_dir, "lockout:\n  lock_secs: 5\n"))
    assert "max_failures" in message and "lock_seconds" in message and "hard_lock_after" in message


@pytest.mark.parametrize("value", [1, 8])
def test_max_devices_edges_are_accepted(value: int) -> None:
    assert parse_settings(f"max_devices: {value}\n").max_devices == value


def test_hard_lock_after_100_is_accepted() -> None:
    assert parse_settings("lockout:\n  hard_lock_after: 100\n").lockout.hard_lock_after == 100


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("issuer: &name acme\n", id="anchor"),
        pytest.param("totp: &t\n  window: 1\n", id="anchor-on-section"),
        pytest.param("lockout:\n  max_failures: &n 3\n  hard_lock_after: *n\n", id="anchor-and-alias"),
        pytest.param("totp: &t {window: 1}\nlockout:\n  <<: *t\n", id="merge-key"),
    ],
)
def test_yaml_anchors_and_aliases_are_refused(conf_dir: Path, text: str) -> None:
    path = write_config(conf_dir, text)
    message = load_error(path)
    assert message.startswith(f"{path}:"), message
    assert "anchors" in message
    line = message.split(":")[1]
    assert line.isdigit() and int(line) >= 1


def test_invalid_yaml_names_the_line(conf_dir: Path) -> None:
    path = write_config(conf_dir, "issuer: acme\ntotp:\n  window: [1\n")
    message = load_error(path)
    assert message.startswith(f"{path}:"), message
    assert "not valid YAML" in message


def test_invalid_utf8_is_refused(conf_dir: Path) -> None:
    path = write_config(conf_dir, b"issuer: \xff\xfe\n")
    message = load_error(path)
    assert str(path) in message and "UTF-8" in message


def test_an_impossible_date_is_a_config_error(conf_dir: Path) -> None:
    """An admin typing 2027-02-30 must get FILE:LINE: key, not a bare ValueError."""
    path = write_config(conf_dir, "enforcement:\n  grace:\n    users: [bob]\n    until: 2027-02-30\n")
    with pytest.raises(ConfigError) as info:
        load_settings(str(path), environ={})
    assert str(info.value).startswith(f"{path}:4: enforcement.grace.until: "), str(info.value)


@pytest.mark.parametrize(
    ("text", "key"),
    [
        pytest.param("issuer: !custom acme\n", "issuer", id="unknown-tag"),
        pytest.param("issuer: !!python/name:os.system acme\n", "issuer", id="python-tag"),
        pytest.param("max_devices: !!int eight\n", "max_devices", id="int-tag-on-text"),
    ],
)
def test_yaml_tags_give_a_config_error(conf_dir: Path, text: str, key: str) -> None:
    path = write_config(conf_dir, text)
    with pytest.raises(ConfigError) as info:
        load_settings(str(path), environ={})
    assert str(info.value).startswith(f"{path}:1: {key}: "), str(info.value)


def test_cross_checks_name_the_file_and_keys(conf_dir: Path) -> None:
    message = load_error(write_config(conf_dir, "lockout:\n  max_failures: 10\n  hard_lock_after: 5\n"))
    assert str(conf_dir) in message
    assert "lockout.hard_lock_after" in message and "lockout.max_failures" in message
    message = load_error(write_config(conf_dir, "enforcement:\n  grace:\n    until: 2027-01-01\n"))
    assert "enforcement.grace.until" in message
    message = load_error(write_config(conf_dir, "database:\n  path: /var/x\n  key_file: /var/x\n"))
    assert "database.path" in message and "database.key_file" in message


def test_values_are_typed() -> None:
    parsed = parse_settings(
        "max_devices: 3\n"
        "totp:\n  digits: 8\n  algorithm: sha256\n  period: 60\n  window: 2\n"
        "usernames:\n  strip_realms: [CORP, EXAMPLE.ORG]\n  case_fold: true\n"
        "enforcement:\n  exempt_users: [svc]\n  grace:\n    until: 2027-01-31\n    users: [bob]\n",
        source="/x.yaml",
    )
    assert parsed.max_devices == 3
    assert (parsed.totp.digits, parsed.totp.algorithm, parsed.totp.period, parsed.totp.window) == (8, "sha256", 60, 2)
    assert parsed.usernames.strip_realms == ("CORP", "EXAMPLE.ORG")
    assert parsed.usernames.case_fold is True
    assert parsed.enforcement.exempt_users == ("svc",)
    assert parsed.enforcement.grace.until == dt.datetime(2027, 1, 31, tzinfo=dt.UTC)
    assert parsed.source == "/x.yaml"
    # Everything not named keeps its default.
    assert parsed.lockout == Settings().lockout
    assert parsed.database == Settings().database


def test_an_empty_file_gives_the_defaults(conf_dir: Path) -> None:
    path = write_config(conf_dir, "# nothing set\n")
    loaded = load_settings(str(path), environ={})
    assert settings_as_dict(loaded) == settings_as_dict(Settings())
    assert loaded.source == str(path)


# ---------------------------------------------------------------------------
# Where settings come from.


def test_defaults_when_the_default_path_is_absent(monkeypatch: pytest.MonkeyPatch, conf_dir: Path) -> None:
    absent = conf_dir / "absent" / "mfaguard.yaml"
    monkeypatch.setattr(settings_module, "DEFAULT_CONFIG_PATH", str(absent))
    for environ in ({}, {"MFAGUARD_CONFIG": ""}):
        loaded = load_settings(environ=environ)
        assert loaded == Settings()
        assert loaded.source is None
    # The daemons and the PAM module require the file.
    with pytest.raises(ConfigError, match="not found"):
        load_settings(require_file=True, environ={})


def test_the_default_path_is_read_when_present(monkeypatch: pytest.MonkeyPatch, conf_dir: Path) -> None:
    path = write_config(conf_dir, "issuer: from-default\n")
    monkeypatch.setattr(settings_module, "DEFAULT_CONFIG_PATH", str(path))
    loaded = load_settings(environ={})
    assert loaded.issuer == "from-default"
    assert loaded.source == str(path)


def test_an_explicit_missing_path_is_an_error(conf_dir: Path) -> None:
    missing = conf_dir / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_settings(str(missing), environ={})
    assert str(missing) in str(info.value)


def test_mfaguard_config_environment_is_honoured(conf_dir: Path) -> None:
    from_env = write_config(conf_dir, "issuer: from-env\n", name="env.yaml")
    explicit = write_config(conf_dir, "issuer: explicit\n", name="explicit.yaml")
    loaded = load_settings(environ={"MFAGUARD_CONFIG": str(from_env)})
    assert loaded.issuer == "from-env"
    assert loaded.source == str(from_env)
    # An explicit path wins over the environment.
    assert load_settings(str(explicit), environ={"MFAGUARD_CONFIG": str(from_env)}).issuer == "explicit"
    # A file named through the environment must exist.
    missing = conf_dir / "missing.yaml"
    with pytest.raises(ConfigError) as info:
        load_settings(environ={"MFAGUARD_CONFIG": str(missing)})
    assert str(missing) in str(info.value)


# ---------------------------------------------------------------------------
# A config file others could change is refused.


@pytest.mark.parametrize("mode", [0o664, 0o646, 0o666, 0o620, 0o602], ids=oct)
def test_a_group_or_world_writable_config_is_refused(conf_dir: Path, mode: int) -> None:
    path = write_config(conf_dir, "issuer: acme\n", mode=mode)
    with pytest.raises(REFUSED) as info:
        load_settings(str(path), environ={})
    assert str(path) in str(info.value)
    assert "writable" in str(info.value)


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o600, 0o400], ids=oct)
def test_a_safe_config_mode_is_accepted(conf_dir: Path, mode: int) -> None:
    path = write_config(conf_dir, "issuer: acme\n", mode=mode)
    assert load_settings(str(path), environ={}).issuer == "acme"


def test_a_config_in_a_writable_folder_is_refused(conf_dir: Path) -> None:
    path = write_config(conf_dir, "issuer: acme\n")
    os.chmod(conf_dir, 0o770)  # noqa: S103 - the unsafe mode is what is tested
    with pytest.raises(REFUSED):
        load_settings(str(path), environ={})


def test_a_symlinked_config_is_refused(conf_dir: Path) -> None:
    real = write_config(conf_dir, "issuer: acme\n", name="real.yaml")
    link = conf_dir / "mfaguard.yaml"
    link.symlink_to(real)
    with pytest.raises(REFUSED, match="symlink"):
        load_settings(str(link), environ={})
    with pytest.raises(REFUSED, match="symlink"):
        load_settings(environ={"MFAGUARD_CONFIG": str(link)})


@pytest.mark.root
def test_a_config_not_owned_by_root_is_refused(lib: type[Lib], require_root: None, conf_dir: Path) -> None:
    path = write_config(conf_dir, "issuer: acme\n")
    os.chown(path, lib.OTHER_UID, lib.OTHER_UID)
    with pytest.raises(REFUSED) as info:
        load_settings(str(path), environ={})
    assert f"uid {lib.OTHER_UID}" in str(info.value)
    assert str(path) in str(info.value)
    assert isinstance(info.value, MfaguardError)


# ---------------------------------------------------------------------------
# The shipped example.


def test_the_example_config_parses_and_equals_the_defaults() -> None:
    if not EXAMPLE.is_file():
        pytest.fail(
            f"{EXAMPLE} is missing: config/mfaguard.yaml must exist, parse, and list exactly the built-in defaults"
        )
    text = EXAMPLE.read_text(encoding="utf-8")
    parsed = parse_settings(text, source=str(EXAMPLE))
    assert settings_as_dict(parsed) == settings_as_dict(Settings())


@pytest.mark.parametrize("written", ["0x2", "0b10", "02", "1_0", "1:00"])
def test_integers_are_decimal_only(written: str) -> None:
    # YAML 1.1 reads 0x2, 0b10, 02 (octal), 1_0 and 1:00 (sexagesimal: 60) as integers.
    with pytest.raises(ConfigError, match=r"t\.yaml:3: radius\.workers: .* is not a plain decimal integer"):
        parse_settings(f"radius:\n  threads: 8\n  workers: {written}\n", "t.yaml")
    assert parse_settings("radius:\n  workers: 2\n", "t.yaml").radius.workers == 2


def test_an_impossible_date_says_what_a_date_looks_like() -> None:
    text = "enforcement:\n  grace:\n    users: [alice]\n    until: 2026-13-45T00:00:00Z\n"
    with pytest.raises(ConfigError, match=r"t\.yaml:4: .*such as 2026-12-31T23:59:00Z"):
        parse_settings(text, "t.yaml")
