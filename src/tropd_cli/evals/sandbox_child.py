"""What runs inside a sandboxed child before the untrusted program: confinement, then ``exec``.

:mod:`tropd_cli.evals.sandbox` starts this file as a script, ``python -I -S -B sandbox_child.py SPEC``
(``SPEC`` is a :class:`LaunchSpec` as JSON), so it imports nothing but the standard library. It does
the privileged steps itself instead of in a ``subprocess`` ``preexec_fn``: a ``preexec_fn`` runs
Python between ``fork`` and ``exec`` of a multi-threaded parent (``run_many`` drives a thread pool),
where a lock held by another thread can deadlock the child and hang ``Popen`` itself.

Steps, in order (each failure is reported on ``error_fd`` and exits with :data:`SETUP_FAILED`, so a
sample never runs with less protection than the sandbox promised):

1. resource limits: CPU seconds, address space, file size, no core files (and processes, 5.);
2. with ``namespaces``: new network, mount and IPC namespaces; world-writable directories and
   directories the sandbox user may not enter are covered by fresh tmpfs mounts; the work dir and
   the interpreter's install are bound back in at their own paths;
3. with ``uid``: drop to that user and group (no supplementary groups);
4. ``PR_SET_NO_NEW_PRIVS`` and a parent-death signal (SIGKILL);
5. ``RLIMIT_NPROC``; then ``exec`` the interpreter on the program, or, with ``disposable_parent``,
   ``fork`` first and stay behind as the program's parent, mirroring its exit status.

:func:`install_guard` is the Python-level fallback that :mod:`tropd_cli.evals.sandbox` prepends to the
program when a kernel-enforced layer is unavailable.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import signal
import sys
from dataclasses import dataclass, field
from typing import NoReturn

#: Exit status of a child whose confinement failed (the reason is on ``error_fd``).
SETUP_FAILED = 125

_CLONE_NEWNS = 0x00020000
_CLONE_NEWIPC = 0x08000000
_CLONE_NEWNET = 0x40000000
_MS_NOSUID = 0x2
_MS_NODEV = 0x4
_MS_BIND = 0x1000
_MS_REC = 0x4000
_MS_PRIVATE = 0x40000
_PR_SET_PDEATHSIG = 1
_PR_SET_NO_NEW_PRIVS = 38


@dataclass
class LaunchSpec:
    """Everything the child needs; built by :mod:`tropd_cli.evals.sandbox`, passed as JSON."""

    python: str  # interpreter that runs the program
    script: str  # absolute path of the program file, inside ``workdir``
    workdir: str
    error_fd: int  # write end of a pipe: setup errors go here
    cpu_s: int
    memory_bytes: int
    file_size_bytes: int
    max_processes: int
    uid: int | None = None
    gid: int | None = None
    namespaces: bool = False
    covers: list[tuple[str, str]] = field(default_factory=list)  # (directory, tmpfs mount options)
    binds: list[str] = field(default_factory=list)  # directories under a cover, bound back in place
    disposable_parent: bool = False


class _SetupError(Exception):
    pass


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _check(step: str, ret: int) -> None:
    if ret != 0:
        errno = ctypes.get_errno()
        raise _SetupError(f"{step}: {os.strerror(errno)} (errno {errno})")


def _set_limits(spec: LaunchSpec) -> None:
    limits = {
        resource.RLIMIT_CORE: (0, 0),
        resource.RLIMIT_CPU: (spec.cpu_s, spec.cpu_s + 1),  # SIGXCPU at the soft limit, SIGKILL one second later
        resource.RLIMIT_AS: (spec.memory_bytes, spec.memory_bytes),
        resource.RLIMIT_FSIZE: (spec.file_size_bytes, spec.file_size_bytes),
    }
    for which, value in limits.items():
        try:
            resource.setrlimit(which, value)
        except (ValueError, OSError) as exc:
            raise _SetupError(f"setrlimit({which}, {value}): {exc}") from exc


def _enter_namespaces(spec: LaunchSpec) -> None:
    libc = _libc()
    _check("unshare(network, mount, IPC namespaces)", libc.unshare(_CLONE_NEWNET | _CLONE_NEWNS | _CLONE_NEWIPC))
    # Mounts made below must stay in this namespace: stop propagation to (and from) the host.
    _check("make / a private mount", libc.mount(b"none", b"/", None, _MS_REC | _MS_PRIVATE, None))
    # Hold the directories to bind back before the covers hide them.
    held = [(path, os.open(path, os.O_PATH | os.O_DIRECTORY)) for path in spec.binds]
    for path, options in spec.covers:
        fs = os.fsencode(path)
        _check(f"mount tmpfs on {path}", libc.mount(b"tmpfs", fs, b"tmpfs", _MS_NOSUID | _MS_NODEV, options.encode()))
    for path, fd in held:
        os.makedirs(path, mode=0o755, exist_ok=True)
        source = f"/proc/self/fd/{fd}".encode()
        _check(f"bind {path} back", libc.mount(source, os.fsencode(path), None, _MS_BIND | _MS_REC, None))
        os.close(fd)


def _drop_privileges(uid: int, gid: int) -> None:
    try:
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)
    except OSError as exc:
        raise _SetupError(f"switch to uid {uid}: {exc}") from exc
    if os.getuid() != uid or os.geteuid() != uid:
        raise _SetupError(f"still uid {os.geteuid()} after switching to uid {uid}")


def _prctl(option: int, value: int, step: str) -> None:
    _check(step, _libc().prctl(option, value, 0, 0, 0))


def _confine(spec: LaunchSpec) -> None:
    _set_limits(spec)
    if spec.namespaces:
        _enter_namespaces(spec)
    if spec.uid is not None:
        _drop_privileges(spec.uid, spec.gid if spec.gid is not None else spec.uid)
    _prctl(_PR_SET_NO_NEW_PRIVS, 1, "prctl(PR_SET_NO_NEW_PRIVS)")
    # Set after the uid switch (which clears it): if the evaluator dies, the sample dies with it.
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, "prctl(PR_SET_PDEATHSIG)")
    try:
        resource.setrlimit(resource.RLIMIT_NPROC, (spec.max_processes, spec.max_processes))
        os.chdir(spec.workdir)  # again: the bind mount put a new directory at this path
    except (ValueError, OSError) as exc:
        raise _SetupError(f"RLIMIT_NPROC / chdir: {exc}") from exc


def _fail(error_fd: int, message: str) -> NoReturn:
    try:
        os.write(error_fd, message.encode(errors="replace")[:4000])
    finally:
        os._exit(SETUP_FAILED)


def _exec_program(spec: LaunchSpec) -> NoReturn:
    os.set_inheritable(spec.error_fd, False)  # closed by a successful exec: an empty pipe means "ran"
    try:
        os.execv(spec.python, [spec.python, "-I", "-S", "-B", spec.script])
    except OSError as exc:
        _fail(spec.error_fd, f"exec {spec.python}: {exc}")


def _mirror_exit(pid: int) -> NoReturn:
    """Wait for the program and leave the way it left: same exit code, or killed by the same signal."""
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code < 0:
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    os._exit(code if code >= 0 else 128 - code)


def main(argv: list[str]) -> NoReturn:
    spec = LaunchSpec(**json.loads(argv[0]))
    spec.covers = [(path, options) for path, options in spec.covers]
    try:
        _confine(spec)
    except Exception as exc:  # anything short of a confined child is a setup failure, never a sample's result
        _fail(spec.error_fd, str(exc) if isinstance(exc, _SetupError) else f"{type(exc).__name__}: {exc}")
    if not spec.disposable_parent:
        _exec_program(spec)
    try:
        pid = os.fork()
    except OSError as exc:
        _fail(spec.error_fd, f"fork: {exc}")
    if pid == 0:
        try:
            _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, "prctl(PR_SET_PDEATHSIG)")
        except _SetupError as exc:
            _fail(spec.error_fd, str(exc))
        _exec_program(spec)
    os.close(spec.error_fd)
    _mirror_exit(pid)


def install_guard(
    workdir: str, marker: str, network: bool, files: bool, signals: bool, fork: bool
) -> None:  # pragma: no cover - runs inside the sandboxed interpreter
    """Python-level fallback for missing kernel layers: an audit hook that refuses, with PermissionError,

    * ``network``: sockets other than AF_UNIX pairs, connect/bind/sendto, name lookups;
    * ``files``: writing, creating, deleting, renaming, linking or changing metadata outside ``workdir``
      (``sqlite3.connect`` included; ``os.mknod`` and ``os.mkfifo``, which raise no audit event, are
      replaced by functions that refuse), opening directories outside it (whose fd could serve as a
      ``dir_fd`` for the above), and reading another process's ``/proc/<pid>`` entries (the evaluator's
      environment and memory);
    * ``signals``: signals to processes outside the sandbox (those without ``marker`` in their
      environment) and to ``-1``;
    * ``fork``: ``os.fork`` beyond the first (used where RLIMIT_NPROC cannot bind, i.e. for root; one fork is
      no bomb, and the code-eval harness needs it to keep the model's code out of its judge's process);
    * always: starting new programs (they would run without this hook; importing ``_posixsubprocess``,
      whose ``fork_exec`` raises no audit event, included) and ``ctypes``.

    An audit hook cannot be removed, but native code (a compiled extension the program writes and
    imports) is not bound by it; it stops ordinary code, not a determined attacker. ``os.mkfifo``
    raises no audit event and is not covered. The source of this function is copied into the
    program, so it imports what it needs itself; that is also why it is one long function (over 100
    lines): the hook and everything it closes over travel as one self-contained piece of source.
    """
    import os
    import sys

    root = os.path.realpath(workdir)
    marker_bytes = marker.encode()
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    # event -> (positions of path arguments, position of the dir_fd for each path, or None)
    path_events = {
        "os.remove": ((0, 1),),
        "os.rmdir": ((0, 1),),
        "os.mkdir": ((0, 2),),
        "os.rename": ((0, 2), (1, 3)),
        "os.replace": ((0, 2), (1, 3)),
        "os.link": ((0, 2), (1, 3)),
        "os.symlink": ((1, 2),),
        "os.truncate": ((0, None),),
        "os.chmod": ((0, 2),),
        "os.chown": ((0, 3),),
        "os.utime": ((0, 3),),
        "os.setxattr": ((0, None),),
        "os.removexattr": ((0, None),),
        "shutil.rmtree": ((0, 1),),
    }
    spawn_events = {"os.exec", "os.posix_spawn", "os.spawn", "os.system", "subprocess.Popen", "os.startfile"}
    net_events = {
        "socket.connect",
        "socket.bind",
        "socket.sendto",
        "socket.sendmsg",
        "socket.getaddrinfo",
        "socket.gethostbyname",
        "socket.gethostbyaddr",
        "socket.getnameinfo",
    }

    def resolve(path, dir_fd=None):
        if isinstance(path, int):
            return os.readlink(f"/proc/self/fd/{path}")
        path = os.fsdecode(os.fspath(path))
        if isinstance(dir_fd, int) and dir_fd >= 0 and not os.path.isabs(path):
            path = os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), path)
        return os.path.realpath(path)

    def inside(path, dir_fd=None):
        try:
            real = resolve(path, dir_fd)
        except (OSError, TypeError, ValueError):
            return False
        return real == root or real.startswith(root + os.sep)

    def in_sandbox(pid):
        if pid == os.getpid():
            return True
        try:
            with open(f"/proc/{pid}/environ", "rb") as fh:
                return marker_bytes in fh.read()
        except OSError:
            return False

    def refuse(what):
        raise PermissionError(f"sandbox: {what} is not allowed here")

    import _thread

    busy = set()  # threads inside the hook: its own /proc reads (in_sandbox) are not checked again
    forks_left = [1]

    def hook(event, args):
        me = _thread.get_ident()
        if me in busy:
            return
        busy.add(me)
        try:
            check(event, args)
        finally:
            busy.discard(me)

    def foreign_proc(path):
        try:
            real = resolve(path)
        except (OSError, TypeError, ValueError):
            return False
        parts = real.split(os.sep)
        return len(parts) > 2 and parts[1] == "proc" and parts[2].isdigit() and int(parts[2]) != os.getpid()

    def check(event, args):
        if event in spawn_events or event.startswith("ctypes."):
            refuse(event)
        if event == "import" and args[0] in ("_posixsubprocess", "posix"):
            refuse(f"importing {args[0]}")
        if fork and event in ("os.fork", "os.forkpty"):
            if forks_left[0] <= 0:
                refuse(event)
            forks_left[0] -= 1
        if network:
            if event == "socket.__new__" and args[1] != 1:  # only AF_UNIX (socketpair) sockets
                refuse("a network socket")
            if event in net_events:
                refuse(event)
        if signals and event in ("os.kill", "os.killpg"):
            target = args[0]
            if event == "os.kill" and target < 0:
                target = -target if target != -1 else None
            if target is None or (target != 0 and not in_sandbox(target)):
                refuse(f"{event}({args[0]})")
        if files:
            memory = (":memory:", "", b":memory:", b"")
            if event == "sqlite3.connect" and args[0] not in memory and not inside(args[0]):
                refuse(f"sqlite3.connect({args[0]!r}) (outside the work dir)")
            if event == "open":
                path, mode, flags = args
                if isinstance(path, int) or inside(path):
                    return
                if foreign_proc(path):
                    refuse(f"reading {path!r} (another process)")
                writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                    isinstance(flags, int) and flags & write_flags
                )
                if writing:
                    refuse(f"writing {path!r} (outside the work dir)")
                if os.path.isdir(path):
                    refuse(f"opening the directory {path!r} (outside the work dir)")
            elif event in path_events:
                for at, fd_at in path_events[event]:
                    dir_fd = args[fd_at] if fd_at is not None and fd_at < len(args) else None
                    if at < len(args) and not inside(args[at], dir_fd):
                        refuse(f"{event} on {args[at]!r} (outside the work dir)")

    if files:

        def no_special_files(*args, **kwargs):
            refuse("creating device nodes and FIFOs")

        import posix

        os.mknod = posix.mknod = no_special_files
        os.mkfifo = posix.mkfifo = no_special_files
    sys.addaudithook(hook)


if __name__ == "__main__":
    main(sys.argv[1:])
