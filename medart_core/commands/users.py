"""User commands: ``users add|list|set-role|passwd|unlock|remove`` over the workspace's users table
(:mod:`medart_core.accounts`). Passwords come from ``--password-stdin`` or a prompt, never from an argument
(which ``ps`` shows to everyone)."""
from __future__ import annotations

import argparse
import sys
import time
from typing import TYPE_CHECKING

from . import add_workspace

if TYPE_CHECKING:  # pragma: no cover
    from ..accounts import UserStore

# Mirrors of medart_core.accounts (checked equal by tests/test_cli.py), so `users --help` does not import it.
ROLES = ("annotator", "trainer", "admin")
ROLE_DOES = {
    "annotator": "captions and blind review",
    "trainer": "captions, blind review, fine-tuning, generation and evaluation",
    "admin": "everything, including users, imports, deletions and caption exports",
}
LOCK_AFTER = 5


def read_password(from_stdin: bool, *, confirm: bool = True) -> str:
    """The password from one line of stdin (``--password-stdin``) or an interactive prompt (typed twice)."""
    from ..errors import ConfigError

    if from_stdin:
        line = sys.stdin.readline()
        return line[:-1] if line.endswith("\n") else line
    if not sys.stdin.isatty():
        raise ConfigError("No terminal to prompt for a password: pipe it in with --password-stdin "
                          "(e.g. `printf '%s\\n' \"$PW\" | python -m medart_core users add NAME --password-stdin`).")
    import getpass

    pw = getpass.getpass("Password: ")
    if confirm and getpass.getpass("Password (again): ") != pw:
        raise ConfigError("The two passwords differ; nothing was changed.")
    return pw


def _store(args: argparse.Namespace) -> "UserStore":
    from ..accounts import UserStore
    from ..workspace import Workspace

    return UserStore.for_workspace(Workspace.open(args.workspace))


def _cmd_add(args: argparse.Namespace) -> int:
    from ..accounts import validate_role, validate_username

    validate_username(args.name)
    validate_role(args.role)
    password = None if args.no_password else read_password(args.password_stdin)
    u = _store(args).add(args.name, args.role, password, by="cli")
    print(f"added {u.name} ({u.role}, signs in with {u.sign_in})")
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    users = _store(args).list()
    if not users:
        print("no users: the studio runs open (on 127.0.0.1 only); `users add NAME --role admin` turns sign-in on")
        return 0
    w = max(4, *(len(u.name) for u in users))
    print(f"{'name':<{w}}  {'role':<9}  {'sign-in':<12}  {'created':<20}  updated")
    for u in users:
        print(f"{u.name:<{w}}  {u.role:<9}  {u.sign_in:<12}  {u.created_at:<20}  {u.updated_at}")
    store = _store(args)
    for lk in store.lockouts():
        state = (f"locked until {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(lk.locked_until))}"
                 if lk.locked() else "not locked")
        print(f"{lk.name}: {lk.failures} failed sign-in(s) in a row, {state} (`users unlock {lk.name}` clears it)")
    return 0


def _cmd_unlock(args: argparse.Namespace) -> int:
    from ..errors import NotFoundError

    store = _store(args)
    name = store.canonical(args.name)
    if name is None:
        raise NotFoundError(f"No user named {args.name!r}: `users list` shows them.")
    print(f"unlocked {name}" if store.clear_failures(name) else f"{name} was not locked")
    return 0


def _cmd_set_role(args: argparse.Namespace) -> int:
    u = _store(args).set_role(args.name, args.role, force=args.force)
    print(f"{u.name} is now {u.role}")
    return 0


def _cmd_passwd(args: argparse.Namespace) -> int:
    from ..errors import NotFoundError

    store = _store(args)
    if store.get(args.name) is None:
        raise NotFoundError(f"No user named {args.name!r}: `users list` shows them.")
    u = store.set_password(args.name, None if args.no_password else read_password(args.password_stdin))
    print(f"{u.name} now signs in with {u.sign_in}")
    return 0


def _cmd_remove(args: argparse.Namespace) -> int:
    _store(args).remove(args.name, force=args.force)
    print(f"removed {args.name}")
    return 0


def _password_options(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--password-stdin", action="store_true", help="read the password from one line of stdin")
    g.add_argument("--no-password", action="store_true",
                   help="no password: the user signs in through Hugging Face on a Space only")


def users(up: argparse.ArgumentParser) -> None:
    usub = up.add_subparsers(dest="users_command", required=True, metavar="ACTION")

    p = usub.add_parser("add", help="add a user (the password is prompted for, or read with --password-stdin)")
    p.add_argument("name")
    p.add_argument("--role", choices=ROLES, required=True, help="; ".join(f"{r}: {d}" for r, d in ROLE_DOES.items()))
    _password_options(p)
    add_workspace(p)
    p.set_defaults(func=_cmd_add)

    p = usub.add_parser("list", help="list users and their roles (never their password hashes)")
    add_workspace(p)
    p.set_defaults(func=_cmd_list)

    p = usub.add_parser("set-role", help="change a user's role (takes effect on their next click)")
    p.add_argument("name")
    p.add_argument("role", choices=ROLES)
    p.add_argument("--force", action="store_true", help="allow demoting the last admin")
    add_workspace(p)
    p.set_defaults(func=_cmd_set_role)

    p = usub.add_parser("passwd", help="set a user's password (prompted for, or read with --password-stdin)")
    p.add_argument("name")
    _password_options(p)
    add_workspace(p)
    p.set_defaults(func=_cmd_passwd)

    p = usub.add_parser("unlock", help="clear a user's failed sign-ins (an account locks after "
                        f"{LOCK_AFTER} in a row)")
    p.add_argument("name")
    add_workspace(p)
    p.set_defaults(func=_cmd_unlock)

    p = usub.add_parser("remove", help="remove a user (refused from their next click on)")
    p.add_argument("name")
    p.add_argument("--force", action="store_true", help="allow removing the last admin while other users remain")
    add_workspace(p)
    p.set_defaults(func=_cmd_remove)
