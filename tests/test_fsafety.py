"""File safety: the database, the key file and their folders cannot be swapped or edited by others."""

from __future__ import annotations

import os
import shutil
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from devicedb import fsafety
from devicedb.errors import UnsafePathError
from devicedb.models import Context
from devicedb.settings import Settings
from devicedb.store import Store
from devicedb.verifier import Verifier

if TYPE_CHECKING:
    from conftest import Lib, MfaEnv

CTX = Context(service="test")

TARGETS = ["database", "database folder", "key file", "key folder"]


def target_path(mfa_env: MfaEnv, target: str) -> Path:
    return {
        "database": mfa_env.db_path,
        "database folder": mfa_env.db_dir,
        "key file": mfa_env.key_path,
        "key folder": mfa_env.key_dir,
    }[target]


def make_symlink(mfa_env: MfaEnv, target: str) -> None:
    """Move the real file or folder to a safe place and leave a symlink to it where it was."""
    path = target_path(mfa_env, target)
    safe = mfa_env.root / "elsewhere"
    safe.mkdir(mode=0o700, exist_ok=True)
    real = safe / path.name
    shutil.move(str(path), str(real))
    path.symlink_to(real)


def add_mode(bits: int) -> Callable[[MfaEnv, str], None]:
    def change(mfa_env: MfaEnv, target: str) -> None:
        path = target_path(mfa_env, target)
        os.chmod(path, (path.stat().st_mode & 0o7777) | bits)

    return change


DEFECTS = {
    "symlink": make_symlink,
    "group-writable": add_mode(0o020),
    "world-writable": add_mode(0o002),
}


@pytest.fixture
def installed(lib: type[Lib], mfa_env: MfaEnv) -> Settings:
    settings = mfa_env.initialise()
    with Store.open(settings, clock=mfa_env.clock) as store:
        lib.enroll(store, "alice", lib.secret_for(1))
    return settings


def test_a_safe_installation_opens(lib: type[Lib], mfa_env: MfaEnv, installed: Settings) -> None:
    """The control case: without a defect, everything opens and verifies."""
    with Store.open(installed, clock=mfa_env.clock) as store:
        verifier = Verifier(installed, store=store, clock=mfa_env.clock)
        assert verifier.verify("alice", lib.code(lib.secret_for(1), lib.T0), CTX).accepted


@pytest.mark.parametrize("defect", DEFECTS)
@pytest.mark.parametrize("target", TARGETS)
def test_store_open_refuses_an_unsafe_path(mfa_env: MfaEnv, installed: Settings, target: str, defect: str) -> None:
    DEFECTS[defect](mfa_env, target)
    with pytest.raises(UnsafePathError) as info:
        Store.open(installed, clock=mfa_env.clock)
    message = str(info.value)
    assert str(target_path(mfa_env, target)) in message
    assert ("symlink" if defect == "symlink" else "writable") in message


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o601, 0o610], ids=oct)
def test_a_key_file_readable_by_others_is_refused(mfa_env: MfaEnv, installed: Settings, mode: int) -> None:
    os.chmod(mfa_env.key_path, mode)
    with pytest.raises(UnsafePathError) as info:
        Store.open(installed, clock=mfa_env.clock)
    assert str(mfa_env.key_path) in str(info.value)


@pytest.mark.parametrize("mode", [0o600, 0o400, 0o700], ids=oct)
def test_a_private_key_file_is_accepted(mfa_env: MfaEnv, installed: Settings, mode: int) -> None:
    os.chmod(mfa_env.key_path, mode)
    Store.open(installed, clock=mfa_env.clock).close()


def test_a_database_readable_by_others_is_not_required_to_be_private(mfa_env: MfaEnv, installed: Settings) -> None:
    # Documented rule: root-owned and not group/world-writable. Its secrets are sealed.
    os.chmod(mfa_env.db_path, 0o644)
    Store.open(installed, clock=mfa_env.clock).close()


@pytest.mark.root
@pytest.mark.parametrize("target", TARGETS)
def test_store_open_refuses_a_path_owned_by_another_uid(
    lib: type[Lib], require_root: None, mfa_env: MfaEnv, installed: Settings, target: str
) -> None:
    path = target_path(mfa_env, target)
    os.chown(path, lib.OTHER_UID, lib.OTHER_UID)
    with pytest.raises(UnsafePathError) as info:
        Store.open(installed, clock=mfa_env.clock)
    assert f"uid {lib.OTHER_UID}" in str(info.value)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("target", ["database", "database folder"])
def test_initialise_refuses_an_unsafe_existing_path(mfa_env: MfaEnv, installed: Settings, target: str) -> None:
    add_mode(0o002)(mfa_env, target)
    with pytest.raises(UnsafePathError):
        Store.initialise(installed, clock=mfa_env.clock)


def test_initialise_refuses_a_symlinked_key_file(mfa_env: MfaEnv, installed: Settings) -> None:
    make_symlink(mfa_env, "key file")
    with pytest.raises(UnsafePathError, match="symlink"):
        Store.initialise(installed, clock=mfa_env.clock)


def test_a_symlink_to_a_missing_database_is_refused_not_followed(mfa_env: MfaEnv) -> None:
    settings = mfa_env.initialise()
    mfa_env.db_path.unlink()
    victim = mfa_env.root / "victim.db"
    mfa_env.db_path.symlink_to(victim)  # dangling
    with pytest.raises(UnsafePathError, match="symlink"):
        Store.open(settings, clock=mfa_env.clock)
    with pytest.raises(UnsafePathError, match="symlink"):
        Store.initialise(settings, clock=mfa_env.clock)
    assert not victim.exists()


@pytest.mark.parametrize("special", ["#", "?", "%41"])
def test_the_database_opened_is_the_file_that_was_checked(lib: type[Lib], mfa_env: MfaEnv, special: str) -> None:
    """A path holding URI-special characters must still name the very file that was checked and used."""
    db_dir = mfa_env.root / f"db{special}x"
    db_path = db_dir / "mfaguard.db"
    settings = mfa_env.settings(db_path=db_path)
    Store.initialise(settings, clock=mfa_env.clock)
    with Store.open(settings, clock=mfa_env.clock) as store:
        lib.enroll(store, "alice", lib.secret_for(1))
    # Nothing was created beside the configured folder.
    assert sorted(p.name for p in mfa_env.root.iterdir()) == sorted([db_dir.name, mfa_env.key_dir.name])
    raw = sqlite3.connect(str(db_path))
    try:
        assert raw.execute("SELECT COUNT(*) FROM devices").fetchone()[0] == 1
    finally:
        raw.close()


# ---------------------------------------------------------------------------
# The fsafety functions themselves.


def test_check_file_and_folder_directly(tmp_path: Path) -> None:
    os.chmod(tmp_path, 0o700)
    good = tmp_path / "good"
    good.write_bytes(b"x")
    os.chmod(good, 0o600)
    assert fsafety.check_file(str(good), "thing").st_size == 1
    fsafety.check_folder(str(tmp_path), "folder")

    with pytest.raises(FileNotFoundError):
        fsafety.check_file(str(tmp_path / "absent"), "thing")
    with pytest.raises(UnsafePathError, match="not a regular file"):
        fsafety.check_file(str(tmp_path), "thing")
    with pytest.raises(UnsafePathError, match="not a directory"):
        fsafety.check_folder(str(good), "folder")

    os.chmod(good, 0o644)
    fsafety.check_file(str(good), "thing")
    with pytest.raises(UnsafePathError, match="readable"):
        fsafety.check_file(str(good), "thing", secret=True)


def test_read_trusted_file_refuses_large_and_symlinked_files(tmp_path: Path) -> None:
    os.chmod(tmp_path, 0o700)
    big = tmp_path / "big"
    big.write_bytes(b"y" * 5000)
    os.chmod(big, 0o600)
    assert fsafety.read_trusted_file(str(big), "thing") == b"y" * 5000
    with pytest.raises(UnsafePathError, match="larger"):
        fsafety.read_trusted_file(str(big), "thing", limit=4096)
    link = tmp_path / "link"
    link.symlink_to(big)
    with pytest.raises(UnsafePathError, match="symlink"):
        fsafety.read_trusted_file(str(link), "thing")


def test_make_private_dir_creates_0700_and_refuses_unsafe(tmp_path: Path) -> None:
    os.chmod(tmp_path, 0o700)
    new = tmp_path / "a" / "b"
    fsafety.make_private_dir(str(new), "folder")
    assert (new.stat().st_mode & 0o777) == 0o700
    os.chmod(new, 0o777)  # noqa: S103 - the unsafe mode is what is tested
    with pytest.raises(UnsafePathError, match="writable"):
        fsafety.make_private_dir(str(new), "folder")
