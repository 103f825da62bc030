"""Running mfa-admin in-process against a private installation: shared by the CLI-level tests.

(A plain module, not conftest.py: other conftest files under tests/ share that module name.)
"""

from __future__ import annotations

import io
import os
import sys
from pathlib import Path

from mfa_admin.cli import main


def make_config(folder: Path, extra: str = "") -> Path:
    """A settings file whose database and key live in ``folder`` (made 0700), initialised."""
    os.chmod(folder, 0o700)
    config = folder / "mfaguard.yaml"
    config.write_text(f"database:\n  path: {folder}/db/m.db\n  key_file: {folder}/key/seal.key\n{extra}")
    os.chmod(config, 0o600)
    rc, _, err = run_cli(config, "init")
    assert rc == 0, err
    return config


def run_cli(config: Path, *args: str, stdin: str = "") -> tuple[int, str, str]:
    """mfa-admin --config CONFIG ARGS, with ``stdin`` as standard input: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    old, sys.stdin = sys.stdin, io.StringIO(stdin)
    try:
        return main(["--config", str(config), *args], out=out, err=err), out.getvalue(), err.getvalue()
    finally:
        sys.stdin = old
