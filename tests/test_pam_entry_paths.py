"""The PAM entry file's path options: never resolved against the caller's working directory.

Under sudo the process runs in the invoking user's working directory, which that user chooses:
a relative `log=` made root create a file through a user's symlink, and a relative `venv=` loaded
a venv the user pointed at.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from types import ModuleType

import pytest

ENTRY = Path(__file__).resolve().parents[1] / "pam_module" / "pam_mfaguard.py"


def entry() -> ModuleType:
    spec = importlib.util.spec_from_file_location("pam_mfaguard_under_test", ENTRY)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_relative_venv_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    module = entry()
    monkeypatch.chdir(tmp_path)
    (tmp_path / "v" / "lib").mkdir(parents=True)
    with pytest.raises(RuntimeError, match="not an absolute path"):
        module._import(["pam_mfaguard.py", "venv=v"], "pam_module.adapter")
    assert module._path_option(["pam_mfaguard.py", "venv=/opt/mfaguard/venv"], "venv") == "/opt/mfaguard/venv"


def test_a_relative_log_is_never_written_relative_to_the_caller(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = entry()
    fallback = tmp_path / "fallback" / "mfaguard.log"
    monkeypatch.setattr(module, "_FALLBACK_LOG", str(fallback))
    caller = tmp_path / "caller"
    caller.mkdir()
    target = tmp_path / "root-owned"
    target.mkdir()
    (caller / "d").symlink_to(target)
    monkeypatch.chdir(caller)
    module._log_failure(["pam_mfaguard.py", "log=d/rel.log"], "a failure")
    assert os.listdir(target) == []
    assert "a failure" in fallback.read_text()
