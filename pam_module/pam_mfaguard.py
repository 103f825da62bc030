"""PAM entry file for pam_python.

    auth    required  /lib/security/pam_python.so /PATH/pam_module/pam_mfaguard.py [options]
    account required  /lib/security/pam_python.so /PATH/pam_module/pam_mfaguard.py [options]

pam_python's interpreter is isolated: it ignores PYTHONPATH and does not put this
file's folder on sys.path. So this file puts mfaguard's own tree (the folder holding
``pam_module/``) and the venv's site-packages (``venv=PATH``, or the ``.venv`` folder
beside ``pam_module/``) ahead of Debian's dist-packages, then hands over to
pam_module.adapter. Should that import fail, it falls back to site.addsitedir, which
also runs the venv's .pth files (an editable install's finder).

Whatever goes wrong here, the answer is a failure, never PAM_SUCCESS or PAM_IGNORE.

A line with ``check=publickey-used`` is sshd's publickey check instead (pam_module/publickey_check.py):
it answers PAM_SUCCESS only for a connection that has passed publickey, and PAM_IGNORE (which
makes the stack ask for the password) for everything else, errors included.
"""

import contextlib
import importlib
import importlib.machinery
import os
import site
import stat
import sys
import time
import traceback

_HERE = os.path.dirname(os.path.abspath(__file__))
_FALLBACK_LOG = "/var/log/mfaguard/mfaguard.log"
_adapter = None
_check = None


def _option(argv, name):
    for arg in argv[1:]:
        if arg.startswith(name + "="):
            return arg[len(name) + 1 :]
    return None


def _path_option(argv, name):
    """A path option, absolute only: a relative one would be resolved against the working directory
    of whoever runs the program (a sudo caller's), which that user chooses."""
    value = _option(argv, name)
    if value is not None and not os.path.isabs(value):
        raise RuntimeError(f"{name}={value!r} on the PAM line is not an absolute path")
    return value


def _log_failure(argv, what):
    """Write a traceback where an administrator will look; never raise."""
    path = _option(argv, "log")
    if path is None or not os.path.isabs(path):
        path = _FALLBACK_LOG  # a relative log= is refused elsewhere; never written relative to the caller
    try:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "a") as f:
            f.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S%z')} mfaguard pam[{os.getpid()}]: {what}\n")
            f.write(traceback.format_exc())
    except Exception:  # noqa: S110 - nothing left to report to
        pass
    with contextlib.suppress(Exception):
        sys.stderr.write(f"mfaguard pam: authentication failed; details in {path}\n")


def code_tree_problems(entry, venv):
    """Why the code this module runs as root could be changed by someone else, or []."""
    source = os.path.dirname(os.path.dirname(os.path.abspath(entry)))
    lib = os.path.join(venv, "lib", f"python{sys.version_info[0]}.{sys.version_info[1]}", "site-packages")
    paths = [source, venv, lib]
    for package in ("pam_module", "devicedb", os.path.join("devicedb", "kinds"), os.path.join("devicedb", "importers")):
        folder = os.path.join(source, package)
        paths.append(folder)
        with contextlib.suppress(OSError):
            paths += [os.path.join(folder, n) for n in os.listdir(folder) if n.endswith(".py")]
    problems = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError as exc:
            problems.append(f"{path}: {exc.strerror}")
            continue
        if st.st_uid != 0:
            problems.append(f"{path} is owned by uid {st.st_uid}, not root")
        elif st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            problems.append(f"{path} is writable by group or others")
    return problems


def _unsafe(path):
    """Why others could change this file or folder, or None."""
    try:
        st = os.stat(path)
    except OSError as exc:
        return f"{path}: {exc.strerror}"
    if st.st_uid != 0:
        return f"{path} is owned by uid {st.st_uid}, not root"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"{path} is writable by group or others"
    return None


class TrustedImports:
    """A meta-path finder in front of the normal one: every module loaded from mfaguard's tree or
    its venv (source, compiled .pyc, extension) must be root's alone, and so must each folder
    between it and that root. Anything else is refused before it runs as root."""

    def __init__(self, roots):
        self.roots = [os.path.abspath(r) for r in roots]
        self.checked = set()

    def _check(self, path):
        path = os.path.abspath(path)
        root = next((r for r in self.roots if path == r or path.startswith(r + os.sep)), None)
        if root is None:
            return
        while path not in self.checked:
            problem = _unsafe(path)
            if problem:
                raise ImportError(f"refusing to import code that others can change: {problem}")
            self.checked.add(path)
            if path == root:
                break
            path = os.path.dirname(path)

    def find_spec(self, name, path=None, target=None):
        spec = importlib.machinery.PathFinder.find_spec(name, path, target)
        if spec is None:
            return None
        for location in (spec.origin, spec.cached, *(spec.submodule_search_locations or ())):
            if location and os.path.exists(location):
                self._check(location)
        return spec


def _is_check(argv):
    return _option(argv, "check") is not None


def _load(argv):
    """The module that handles this line: the adapter, or the publickey check for a check= line."""
    global _adapter, _check
    if _is_check(argv):
        if _check is None:
            _check = _import(argv, "pam_module.publickey_check")
        return _check
    if _adapter is None:
        _adapter = _import(argv, "pam_module.adapter")
    return _adapter


_paths = None  # (source, lib) once sys.path and the TrustedImports finder are set up


def _import(argv, name):
    global _paths
    if _paths is None:
        venv = _path_option(argv, "venv") or os.path.join(os.path.dirname(_HERE), ".venv")
        lib = os.path.join(venv, "lib", f"python{sys.version_info[0]}.{sys.version_info[1]}", "site-packages")
        if not os.path.isdir(lib):
            raise RuntimeError(f"mfaguard venv not found: {lib} does not exist (set venv=PATH on the PAM line)")
        # This file sits in mfaguard's own tree (a checkout, or site-packages for a plain install),
        # so that tree goes first, then the venv ahead of Debian's dist-packages (which holds an
        # older cryptography). Putting the tree on the path directly spares every login the
        # editable-install finder that site.addsitedir would import (about 20 ms).
        source = os.path.dirname(_HERE)
        # The code below runs as root on every login: refuse it if anybody but root could change it.
        problems = code_tree_problems(__file__, venv)
        if problems:
            raise RuntimeError("refusing to run mfaguard code that others can change: " + "; ".join(problems))
        sys.path[:] = [source, lib] + [p for p in sys.path if p not in (source, lib)]
        sys.meta_path.insert(0, TrustedImports([source, lib, venv]))
        _paths = (source, lib)
    try:
        return importlib.import_module(name)
    except ImportError:
        # A layout the fast path does not know: let site process the venv's .pth files.
        source, lib = _paths
        before = [p for p in sys.path if p not in (source, lib)]
        site.addsitedir(lib)
        added = [p for p in sys.path if p not in before]
        sys.path[:] = added + before
        return importlib.import_module(name)


def pam_sm_authenticate(pamh, flags, argv):
    try:
        return _load(argv).authenticate(pamh, flags, argv)
    except BaseException:
        if _is_check(argv):
            # The publickey check proves nothing when it breaks: the stack asks for the password.
            _log_failure(argv, "the publickey check failed with an internal error; the password is asked")
            return pamh.PAM_IGNORE
        _log_failure(argv, "authentication failed with an internal error")
        return pamh.PAM_AUTH_ERR


def pam_sm_setcred(pamh, flags, argv):
    try:
        return _load(argv).setcred(pamh, flags, argv)
    except BaseException:
        _log_failure(argv, "setcred failed with an internal error")
        return pamh.PAM_IGNORE if _is_check(argv) else pamh.PAM_CRED_ERR


def pam_sm_acct_mgmt(pamh, flags, argv):
    try:
        return _load(argv).acct_mgmt(pamh, flags, argv)
    except BaseException:
        _log_failure(argv, "account check failed with an internal error")
        return pamh.PAM_PERM_DENIED
