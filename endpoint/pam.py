"""PAM for a multi-user endpoint (``pam: {enabled: true, service: tether}`` in config.yaml).

Looking an account up in ``pwd`` says it exists, not that it may be used: an expired or locked
account, one outside its allowed hours, or one a site's access rules refuse would still run
tasks. With PAM on, the multi-user endpoint asks the host's PAM stack, as ``sshd`` or ``login``
would, through ``pamela`` (``pip install 'tether[pam]'``):

* **account** (``pam_acct_mgmt``) before a user endpoint starts: a refusal fails the user's task
  in words, and nothing starts;
* **session** (``pam_open_session``) around the user endpoint's life: a small launcher, run as
  root, opens the session (limits, namespaces, home mounts: whatever the service's stack does),
  forks, drops to the user's account and execs the user endpoint, waits for it, then closes the
  session. What the session sets on the launcher (``pam_limits``' rlimits) the user endpoint
  inherits.

The PAM service names the file in ``/etc/pam.d/`` (``tether`` by default: see
docs/multi-user.md for one to start from). Authentication is not asked of PAM: identities come
from the service's tokens (or Globus Auth), never from a password typed here.
"""

from __future__ import annotations

import os
import pwd
import signal
import sys
from typing import Any

from .identity import MappingRefused

#: the PAM service used when ``pam.service`` is not given
DEFAULT_SERVICE = "tether"


def _pamela() -> Any:
    try:
        import pamela
    except ImportError:
        raise MappingRefused("this multi-user endpoint has pam.enabled but the PAM binding is not installed: "
                             "pip install 'tether[pam]'") from None
    return pamela


def check_account(name: str, service: str) -> None:
    """Raise MappingRefused, in PAM's words, unless PAM's account checks let ``name`` in."""
    pamela = _pamela()
    try:
        pamela.check_account(name, service=service)
    except pamela.PAMError as exc:
        raise MappingRefused(f"the account {name!r} is refused by PAM (service {service!r}, account checks): "
                             f"{exc}; ask the host's administrator (an expired or locked account?)") from None


def launcher_argv(service: str, name: str, argv: list[str]) -> list[str]:
    """The command that runs ``argv`` as ``name`` inside a PAM session (see :func:`main`)."""
    return [sys.executable, "-m", "tether.endpoint.pam", service, name, "--", *argv]


def main() -> None:
    """``python -m tether.endpoint.pam SERVICE USER -- ARGV...``, as root: open a PAM session for
    USER, run ARGV as USER (its groups, gid, uid; stdin, stdout, environment, directory and
    umask as given), pass on SIGTERM/SIGINT/SIGHUP, close the session when it ends and exit
    with its status."""
    if len(sys.argv) < 5 or sys.argv[3] != "--":
        sys.exit("usage: python -m tether.endpoint.pam SERVICE USER -- ARGV...")
    service, name, argv = sys.argv[1], sys.argv[2], sys.argv[4:]
    if os.geteuid() != 0:
        sys.exit("tether PAM launcher: must run as root (it opens a session, then becomes the user)")
    account = pwd.getpwnam(name)
    if account.pw_uid == 0 or account.pw_gid == 0:
        sys.exit("tether PAM launcher: refusing to run anything as a privileged account")
    pamela = _pamela()
    try:
        pamela.open_session(name, service=service)
    except pamela.PAMError as exc:
        sys.exit(f"tether PAM launcher: PAM refused to open a session for {name!r} (service {service!r}): {exc}")
    child = os.fork()
    if child == 0:  # the user's side: no way back to root (the user endpoint checks again)
        try:
            os.setgroups(os.getgrouplist(name, account.pw_gid))
            os.setgid(account.pw_gid)
            os.setuid(account.pw_uid)
            os.execv(argv[0], argv)
        finally:
            os._exit(127)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda s, _frame: _forward(child, s))
    while True:
        try:
            _, status = os.waitpid(child, 0)
            break
        except InterruptedError:
            continue
    try:
        pamela.close_session(name, service=service)
    except pamela.PAMError as exc:
        print(f"tether PAM launcher: closing the session of {name!r} failed: {exc}", file=sys.stderr)
    code = os.waitstatus_to_exitcode(status)
    sys.exit(code if code >= 0 else 128 - code)  # killed by a signal: as a shell reports it


def _forward(child: int, sig: int) -> None:
    try:
        os.kill(child, sig)
    except ProcessLookupError:
        pass


if __name__ == "__main__":
    main()
