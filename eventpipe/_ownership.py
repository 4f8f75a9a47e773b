"""Who may steer a root process: the owner of a log folder, never root's by accident.

Whoever may write inside a log folder can plant files there that a process working in it will
read and write (no links since :mod:`eventpipe._layout`, but contents, names, sizes). That
is fine between the users of one group sharing a log: each can do to the log what the others
can. A process running as root must not take part, or a member of the group steers root. The
rule, like git's ``safe.directory``:

- :func:`check_owner`: the library, running as root (euid 0), refuses a log folder owned by
  another user, unless told to trust it (the ``trust_owner`` option). Non-root processes are
  never refused: the group-shared layout has users of one group share logs one of them made.
- :func:`drop_to_owner`: the ``eventpipe`` command, run by root on a folder another user owns,
  becomes that user (uid, the folder's group, the user's other groups) before it opens
  anything, so what it creates belongs to that user and nothing it does reaches root-only
  files. It does what ``runuser -u OWNER -g GROUP -- eventpipe ...`` would, for the whole run.
  A symbolic link on the way to the log that another user owns counts the same: that user
  chose where the command goes, so it goes there with that user's rights.
"""

from __future__ import annotations

import grp
import os
import pwd
import stat

from .errors import StorageError, UnsafePathError

__all__ = ["check_owner", "drop_to_owner", "group_name", "user_name"]


def user_name(uid: int) -> str:
    """``name (uid N)``, or ``uid N`` for a uid without a passwd entry."""
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def group_name(gid: int) -> str:
    """``name (gid N)``, or ``gid N`` for a gid without a group entry."""
    try:
        return f"{grp.getgrgid(gid).gr_name} (gid {gid})"
    except KeyError:
        return f"gid {gid}"


def check_owner(folder_stat: os.stat_result, path: str, trust: bool) -> None:
    """Refuse, when running as root, a log folder that another user owns.

    ``folder_stat`` is the ``fstat`` of the open log folder, ``path`` its path (for the
    message), ``trust`` the ``trust_owner`` option. Raises UnsafePathError naming the folder
    and its owner; returns for a non-root process, a root-owned folder, or ``trust``.
    """
    if trust or os.geteuid() != 0 or folder_stat.st_uid == 0:
        return
    owner = user_name(folder_stat.st_uid)
    raise UnsafePathError(
        f"log folder is owned by {owner}, not root: a root process refuses to use it, "
        "because whoever owns it can steer what root reads and writes there; run as its "
        f"owner (runuser -u {_login(folder_stat.st_uid)} -- ...; the eventpipe command does "
        "this by itself), or trust it with trust_owner=True (EVENTPIPE_TRUST_OWNER=1)",
        path=path)


def _login(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"#{uid}"  # runuser and sudo take #UID for a user without a name


def _nearest_existing(path: str) -> tuple[str, os.stat_result]:
    """``path`` and its status (a link there followed: the operator's), else the nearest
    existing folder above it: where a missing log would be created."""
    while True:
        try:
            return path, os.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            parent = os.path.dirname(path)
            if parent == path:
                raise
            path = parent


def _links_on_the_way(path: str) -> list[tuple[str, os.stat_result]]:
    """Every symbolic link resolving the absolute ``path`` follows, in order, with its own
    status (up to the first missing component)."""
    found: list[tuple[str, os.stat_result]] = []
    todo = list(reversed(path.split("/")))
    current = "/"
    while todo and len(found) <= 40:  # the kernel's own limit (ELOOP)
        name = todo.pop()
        if name in ("", "."):
            continue
        if name == "..":
            current = os.path.dirname(current)
            continue
        candidate = os.path.join(current, name)
        try:
            st = os.lstat(candidate)
        except (FileNotFoundError, NotADirectoryError):
            break
        if not stat.S_ISLNK(st.st_mode):
            current = candidate
            continue
        found.append((candidate, st))
        target = os.readlink(candidate)
        if target.startswith("/"):
            current = "/"
        todo.extend(reversed(target.split("/")))
    return found


def _groups_of(uid: int, gid: int, where: str,
               what: str) -> tuple[pwd.struct_passwd | None, int, list[int]]:
    """The owner's passwd entry (None if unknown), the primary group to take (the folder's
    ``gid``, or the owner's own for group root) and the supplementary groups (root's left
    out). UnsafePathError when only root's group is left."""
    try:
        entry: pwd.struct_passwd | None = pwd.getpwuid(uid)
    except KeyError:
        entry = None
    if gid == 0:
        # Root's group reads files no member of a log's group should reach through it.
        if entry is None or entry.pw_gid == 0:
            raise UnsafePathError(
                f"{what} is owned by {user_name(uid)} and group root: refusing to run as that "
                "user in group root; give the folder its own group (chgrp)", path=where)
        gid = entry.pw_gid
    groups = [gid]
    if entry is not None:
        groups = [g for g in os.getgrouplist(entry.pw_name, gid) if g != 0]
    return entry, gid, groups


def drop_to_owner(path: str | os.PathLike[str]) -> str | None:
    """As root, become the owner of the log folder at ``path``; a message saying so, or None.

    Nothing happens (None) unless the process runs as root and the folder (or, if it does not
    exist yet, the nearest existing folder above it) belongs to another user, or a symbolic
    link on the way to it does: a link's owner decides where the command goes, so it runs as
    that user (the last such link's, with the link's group). Then the process takes the
    folder's group as its primary group, the owner's other groups (those in the group
    database, root's group left out) as its supplementary groups, and the owner's uid as
    real, effective and saved uid: for good, capabilities included. A folder of group root
    gives the owner's own primary group instead. Call it before opening anything in the log,
    and before starting threads. Raises UnsafePathError when there is no group to take but
    root's, StorageError if the change fails (nothing is done as the owner then).
    """
    if os.geteuid() != 0:
        return None
    log = os.path.abspath(os.fspath(path))
    where, st = _nearest_existing(log)
    steering = [(link, lst) for link, lst in _links_on_the_way(log) if lst.st_uid != 0]
    if steering:
        where, st = steering[-1]
    uid, gid = st.st_uid, st.st_gid
    if uid == 0:
        return None
    entry, gid, groups = _groups_of(uid, gid, where, "link" if steering else "folder")
    try:
        os.setgroups(groups)
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
    except OSError as exc:
        raise StorageError.from_os_error(
            exc, f"become {user_name(uid)}, the owner", path=where) from exc
    try:
        os.setresuid(0, 0, 0)
    except PermissionError:
        pass  # as it must be: there is no way back
    else:  # pragma: no cover - the kernel let us back: nothing was dropped
        raise UnsafePathError(f"could not give up root to become {user_name(uid)}", path=where)
    if entry is not None:
        # What runuser sets, so that a handler's ~ is the owner's, not root's.
        os.environ.update(HOME=entry.pw_dir, USER=entry.pw_name, LOGNAME=entry.pw_name)
    if steering:
        whose = f"the link {where} on the way to {log}"
    elif where == log:
        whose = log
    else:
        whose = f"{where} (where {log} would be created)"
    return (f"running as {user_name(uid)} and {group_name(gid)}, the owner of {whose}; "
            "root does not work in folders other users control")
