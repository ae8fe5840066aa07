"""Run untrusted Python programs (model-written code) in a throwaway sandbox, one process each.

Every program runs as ``python -I -S -B main.py`` (isolated mode: no environment variables, no user
site, no current-dir imports; ``-S``: only the standard library) in a fresh ``tempfile.mkdtemp()``
work dir that is removed afterwards, also after a timeout. It gets a minimal environment (``HOME``
and ``TMPDIR`` are the work dir), stdin from a file or ``/dev/null``, and stdout/stderr go to
files of which the last 4 KiB are kept. It starts its own session; when it exits, times out or is
killed, its process group and every process it left behind are killed (found by the sample's uid,
or else by a marker in the environment that forked children inherit). A sample's crash, hang or
hostility is its result (``ExecResult.status``); only a sandbox that cannot start raises.

Layers, probed once per process by :func:`detect_isolation` (``Isolation.describe()`` says which
are on):

* Always (rlimits, set by :mod:`tropd_cli.evals.sandbox_child` before ``exec``): wall time (the whole
  sample is killed), CPU seconds per process (RLIMIT_CPU), address space per process (RLIMIT_AS),
  file size (RLIMIT_FSIZE), no core files, processes (RLIMIT_NPROC), ``PR_SET_NO_NEW_PRIVS``, and
  SIGKILL when the evaluator dies (``PR_SET_PDEATHSIG``).
* Own uid per sample (needs root): the program runs as an unused uid (61000 and up, one per running
  sample, no groups), so the work dir is its only writable place outside world-writable
  directories, it cannot signal the evaluator or other samples (``os.kill`` gets EPERM), and
  RLIMIT_NPROC counts exactly its own processes. Fallback: the Python guard refuses writes outside
  the work dir and signals to processes outside the sandbox, and the program runs under a
  disposable parent process, so ``os.kill(os.getppid(), SIGKILL)`` kills that instead of the
  evaluator. Without an own uid, root is not bound by RLIMIT_NPROC, so the guard refuses
  ``os.fork`` then; a non-root evaluator gets RLIMIT_NPROC = its current thread count + the budget.
* Network, mount and IPC namespaces (need CAP_SYS_ADMIN: root outside a locked-down container): no
  network at all, loopback included; /tmp, /var/tmp, /dev/shm and /run/lock are private tmpfs
  mounts that vanish with the sample; directories the sample's uid may not enter (e.g. a 0700
  /root holding the interpreter) are covered by an empty tmpfs, and the work dir and the
  interpreter's install are bound back at their own paths. Fallback (the "socket prelude"): the
  Python guard refuses every socket but AF_UNIX pairs, connect/bind/sendto and name lookups.

The Python guard (:func:`tropd_cli.evals.sandbox_child.install_guard`, prepended to the program whenever a
layer is missing) is an audit hook; it also refuses starting other programs and ``ctypes``. It is
the weaker layer: native code can get past it. For the kernel to enforce everything, run the
evaluation as root (e.g. in a container with CAP_SYS_ADMIN). Not bounded in any mode: disk use in
the work dir (per file by RLIMIT_FSIZE, in time by the wall limit) and memory summed over a sample's
processes (RLIMIT_AS is per process; RLIMIT_NPROC bounds their number).
"""

from __future__ import annotations

import dataclasses
import fcntl
import functools
import grp
import inspect
import json
import logging
import math
import os
import pwd
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import IO, Literal

from tropd_cli.evals import sandbox_child
from tropd_cli.evals.sandbox_child import LaunchSpec

Status = Literal["ok", "failed", "timeout", "crashed", "killed"]

log = logging.getLogger(__name__)

TAIL_BYTES = 4096
MARKER_VAR = "TROPD_SANDBOX_ID"
#: World-writable directories hidden behind private tmpfs mounts (with namespaces).
SCRATCH_DIRS = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")
SCRATCH_OPTIONS = "mode=1777,size=64m"
COVER_OPTIONS = "mode=0755,size=1m"
FIRST_SANDBOX_UID = 61000
SANDBOX_UIDS = 2000


class SandboxError(RuntimeError):
    """The sandbox itself could not be set up (not the program's fault)."""


@dataclass(frozen=True)
class ExecResult:
    """How one program ended. ``passed`` means exit code 0 within the limits."""

    passed: bool
    status: Status
    returncode: int
    stdout_tail: str
    stderr_tail: str
    seconds: float


@dataclass(frozen=True)
class Isolation:
    """Which kernel-enforced layers a run uses; the Python guard stands in for the missing ones."""

    own_uid: bool
    namespaces: bool
    notes: tuple[str, ...] = ()

    @property
    def guard_network(self) -> bool:
        return not self.namespaces

    @property
    def guard_files(self) -> bool:
        return not (self.own_uid and self.namespaces)

    @property
    def guard_signals(self) -> bool:
        return not self.own_uid

    @property
    def guard_fork(self) -> bool:
        return not self.own_uid and os.geteuid() == 0  # RLIMIT_NPROC does not bind root

    @property
    def guarded(self) -> bool:
        return self.guard_network or self.guard_files or self.guard_signals

    def describe(self) -> str:
        """One line per layer: active, or which fallback stands in."""
        lines = [
            "wall/CPU time, memory, file size and process limits: active",
            "own uid per sample: "
            + ("active" if self.own_uid else "unavailable; Python guard for files and signals, disposable parent"),
            "network/mount/IPC namespaces: "
            + ("active" if self.namespaces else "unavailable; Python guard for sockets (weaker)"),
        ]
        if self.guard_fork:
            lines.append("os.fork: refused by the Python guard (root without its own uid is not bound by RLIMIT_NPROC)")
        return "\n".join(lines + [f"note: {note}" for note in self.notes])


# ---------------------------------------------------------------------------------------------
# Public API


def run_program(
    code: str,
    *,
    timeout_s: float = 10.0,
    cpu_s: float | None = None,
    memory_mb: int = 1024,
    max_processes: int = 32,
    file_size_mb: int = 64,
    stdin: str | bytes | None = None,
    isolation: Isolation | None = None,
) -> ExecResult:
    """Run ``code`` as a Python program in its own sandbox; never raises for anything the program does.

    ``timeout_s`` is wall time; ``cpu_s`` (default: ``timeout_s``) is CPU time per process;
    ``memory_mb`` is the address-space limit per process; ``max_processes`` bounds how many processes
    the sample may have at once (counted exactly with its own uid, see the module docstring).
    Raises :class:`SandboxError` only when the sandbox cannot be set up at all.
    """
    iso = isolation or detect_isolation()
    return _run(
        code,
        iso,
        timeout_s=timeout_s,
        cpu_s=timeout_s if cpu_s is None else cpu_s,
        memory_mb=memory_mb,
        max_processes=max_processes,
        file_size_mb=file_size_mb,
        stdin=stdin,
    )


def run_many(
    programs: Sequence[str],
    *,
    workers: int | None = None,
    timeout_s: float = 10.0,
    cpu_s: float | None = None,
    memory_mb: int = 1024,
    max_processes: int = 32,
    file_size_mb: int = 64,
    isolation: Isolation | None = None,
    stdins: Sequence[str | bytes | None] | None = None,
) -> list[ExecResult]:
    """:func:`run_program` on each program (with ``stdins[i]`` as its stdin), ``workers`` at a time (default: one
    per CPU); results in input order."""
    iso = isolation or detect_isolation()  # probe once, before the threads start
    inputs = list(stdins) if stdins is not None else [None] * len(programs)
    if len(inputs) != len(programs):
        raise ValueError(f"{len(programs)} programs but {len(inputs)} stdins")

    def one(code: str, stdin: str | bytes | None) -> ExecResult:
        return run_program(
            code,
            timeout_s=timeout_s,
            cpu_s=cpu_s,
            memory_mb=memory_mb,
            max_processes=max_processes,
            file_size_mb=file_size_mb,
            stdin=stdin,
            isolation=iso,
        )

    with ThreadPoolExecutor(max_workers=max(1, workers or os.cpu_count() or 1)) as pool:
        return list(pool.map(one, programs, inputs))


@functools.lru_cache(maxsize=1)
def detect_isolation() -> Isolation:
    """The strongest :class:`Isolation` that works on this machine, found by running a trivial program."""
    if os.geteuid() != 0:
        return Isolation(False, False, ("not running as root: own uid and namespaces need root",))
    notes: list[str] = []
    for iso in (Isolation(True, True), Isolation(True, False), Isolation(False, True)):
        try:
            result = _run("print('ok')", iso, timeout_s=30.0, cpu_s=30.0, memory_mb=1024, max_processes=8)
        except SandboxError as exc:
            notes.append(f"{_label(iso)} unavailable: {exc}")
            continue
        if result.passed and result.stdout_tail.strip() == "ok":
            return dataclasses.replace(iso, notes=tuple(notes))
        notes.append(f"{_label(iso)}: probe program ended with {result.status}: {result.stderr_tail.strip()[-300:]}")
    return Isolation(False, False, tuple(notes))


# ---------------------------------------------------------------------------------------------
# One run


def _run(
    code: str,
    iso: Isolation,
    *,
    timeout_s: float,
    cpu_s: float,
    memory_mb: int,
    max_processes: int,
    file_size_mb: int = 64,
    stdin: str | bytes | None = None,
) -> ExecResult:
    marker = uuid.uuid4().hex
    workdir = tempfile.mkdtemp(prefix="tropd-sandbox-")
    try:
        with _sandbox_uid(iso.own_uid) as uid:
            if uid is not None:
                os.chown(workdir, uid, uid)
            script = os.path.join(workdir, "main.py")
            with open(script, "w", encoding="utf-8") as fh:
                fh.write(_prelude(iso, workdir, marker) + code)
            os.chmod(script, 0o644)
            spec = LaunchSpec(
                python=_interpreter(),
                script=script,
                workdir=workdir,
                error_fd=-1,
                cpu_s=max(1, math.ceil(cpu_s)),
                memory_bytes=memory_mb * 2**20,
                file_size_bytes=file_size_mb * 2**20,
                max_processes=max_processes if uid is not None else _nproc_budget(max_processes),
                uid=uid,
                gid=uid,
                namespaces=iso.namespaces,
                disposable_parent=not iso.own_uid,
            )
            if iso.namespaces:
                spec.covers, spec.binds = _mount_plan([workdir, sys.base_prefix, os.path.dirname(spec.python)])
            return _launch(spec, marker, timeout_s, stdin)
    finally:
        _remove_tree(workdir)


def _launch(spec: LaunchSpec, marker: str, timeout_s: float, stdin: str | bytes | None) -> ExecResult:
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": spec.workdir,
        "TMPDIR": spec.workdir,
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        MARKER_VAR: marker,
    }
    with _input_file(stdin) as stdin_file, tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        err_read, spec.error_fd = os.pipe()
        argv = [sys.executable, "-I", "-S", "-B", sandbox_child.__file__, json.dumps(dataclasses.asdict(spec))]
        t0 = time.perf_counter()
        try:
            try:
                proc = subprocess.Popen(
                    argv,
                    stdin=stdin_file,
                    stdout=out,
                    stderr=err,
                    cwd=spec.workdir,
                    env=env,
                    start_new_session=True,
                    pass_fds=(spec.error_fd,),
                )
            finally:
                os.close(spec.error_fd)
            try:
                finished = _wait_unreaped(proc.pid, timeout_s)
            finally:
                # The exited leader stays a zombie until reaped, so its pid (the group id) cannot be reused yet.
                if not _kill_sandbox(proc.pid, marker, spec.uid):
                    log.warning("sandbox: processes of a sample survived SIGKILL (uid %s, marker %s)", spec.uid, marker)
                returncode = proc.wait()
            seconds = time.perf_counter() - t0
            setup_error = _read_setup_error(err_read)
        finally:
            os.close(err_read)
        if setup_error is not None:
            raise SandboxError(
                f"sandbox setup failed: {setup_error}. detect_isolation() picks the layers this machine supports; "
                "the kernel layers need root (and CAP_SYS_ADMIN for namespaces)"
            )
        status = _status(returncode, timed_out=not finished)
        return ExecResult(status == "ok", status, returncode, _tail(out), _tail(err), seconds)


def _wait_unreaped(pid: int, timeout_s: float) -> bool:
    """Wait until ``pid`` exits, without reaping it; False on timeout."""
    deadline = time.monotonic() + timeout_s
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        pidfd = None
    if pidfd is not None:
        try:
            while True:
                ready, _, _ = select.select([pidfd], [], [], max(0.0, deadline - time.monotonic()))
                if ready:
                    return True
                if time.monotonic() >= deadline:
                    return False
        finally:
            os.close(pidfd)
    delay = 0.0005
    while True:  # no pidfd (Linux < 5.3): poll
        if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(delay)
        delay = min(2 * delay, 0.02)


def _status(returncode: int, timed_out: bool) -> Status:
    if timed_out or returncode == -signal.SIGXCPU:
        return "timeout"
    if returncode == 0:
        return "ok"
    if returncode > 0:
        return "failed"
    return "killed" if returncode == -signal.SIGKILL else "crashed"


# ---------------------------------------------------------------------------------------------
# Helpers


def _label(iso: Isolation) -> str:
    parts = (["own uid"] if iso.own_uid else []) + (["namespaces"] if iso.namespaces else [])
    return " + ".join(parts) or "no kernel layers"


def _interpreter() -> str:
    """The base interpreter: with ``-I -S`` a virtualenv adds nothing, and its path may be private."""
    return os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)


def _prelude(iso: Isolation, workdir: str, marker: str) -> str:
    if not iso.guarded:
        return ""
    source = textwrap.dedent(inspect.getsource(sandbox_child.install_guard))
    call = (
        f"install_guard({workdir!r}, {marker!r}, network={iso.guard_network}, files={iso.guard_files}, "
        f"signals={iso.guard_signals}, fork={iso.guard_fork})"
    )
    return f"{source}\n{call}\ndel install_guard\n"


def _mount_plan(needed: list[str]) -> tuple[list[tuple[str, str]], list[str]]:
    """tmpfs covers (scratch dirs, and dirs other users cannot enter) and the ``needed`` dirs to bind back."""
    covers = {os.path.realpath(d): SCRATCH_OPTIONS for d in SCRATCH_DIRS if os.path.isdir(d)}
    for path in needed:
        parts = os.path.realpath(path).split(os.sep)
        for i in range(2, len(parts)):  # the first ancestor below / that others cannot enter
            ancestor = os.sep.join(parts[:i])
            if not os.stat(ancestor).st_mode & stat.S_IXOTH:
                covers.setdefault(ancestor, COVER_OPTIONS)
                break
    # A cover inside another cover is hidden by it anyway.
    top = {d: o for d, o in covers.items() if not any(_is_under(d, other) for other in covers if other != d)}
    hidden = {os.path.realpath(p) for p in needed if any(_is_under(os.path.realpath(p), d) for d in top)}
    binds = [p for p in hidden if not any(_is_under(p, other) for other in hidden if other != p)]
    return sorted(top.items()), sorted(binds)


def _is_under(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip(os.sep) + os.sep)


def _nproc_budget(max_processes: int) -> int:
    """RLIMIT_NPROC counts every thread of the uid: without an own uid, allow what runs now plus the budget."""
    uid = os.getuid()
    tasks = 0
    for pid in _pids():
        try:
            if os.stat(f"/proc/{pid}").st_uid == uid:
                tasks += len(os.listdir(f"/proc/{pid}/task"))
        except OSError:
            continue
    return tasks + max_processes


def _pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[1].split()[0] == b"Z"
    except (OSError, IndexError):
        return True  # gone


def _belongs(pid: int, marker: bytes, uid: int | None) -> bool:
    try:
        if uid is not None:  # the real uid: /proc/PID's owner changes with the dumpable flag
            with open(f"/proc/{pid}/status", "rb") as fh:
                for line in fh:
                    if line.startswith(b"Uid:"):
                        return int(line.split()[1]) == uid
            return False
        with open(f"/proc/{pid}/environ", "rb") as fh:
            return marker in fh.read()
    except OSError:
        return False


def _kill_sandbox(pgid: int, marker: str, uid: int | None) -> bool:
    """SIGKILL the sample's process group, then every process that is the sample's; True once none is left."""
    with suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
    tag = f"{MARKER_VAR}={marker}".encode()
    for _ in range(100):
        victims = [pid for pid in _pids() if _belongs(pid, tag, uid) and not _is_zombie(pid)]
        if not victims:
            return True
        for pid in victims:
            with suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.01)
    return False


class _UidPool:
    """Unused uids for samples, one per running sample, locked across processes with flock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._busy: set[int] = set()
        self._lock_dir = os.path.join(tempfile.gettempdir(), "tropd-sandbox-uids")

    def acquire(self) -> tuple[int, int]:
        os.makedirs(self._lock_dir, mode=0o700, exist_ok=True)
        with self._lock:
            for uid in range(FIRST_SANDBOX_UID, FIRST_SANDBOX_UID + SANDBOX_UIDS):
                if uid in self._busy or _uid_taken(uid):
                    continue
                fd = os.open(os.path.join(self._lock_dir, str(uid)), os.O_RDWR | os.O_CREAT, 0o600)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)
                    continue
                if not _reclaim(uid):  # left over and unkillable: keep away from it
                    os.close(fd)
                    continue
                self._busy.add(uid)
                return uid, fd
        raise SandboxError(f"all {SANDBOX_UIDS} sandbox uids from {FIRST_SANDBOX_UID} are in use; use fewer workers")

    def release(self, uid: int, fd: int) -> None:
        with self._lock:
            self._busy.discard(uid)
            os.close(fd)


def _reclaim(uid: int) -> bool:
    """Clear a sandbox uid whose lock is free: no evaluator holds it, so any process still running as it (one a
    sample double-forked before its evaluator was killed with SIGKILL) is a leftover: killed; so are the work
    dirs it owns. Whether the uid is clear now."""
    leftovers = [pid for pid in _pids() if _belongs(pid, b"", uid)]
    for pid in leftovers:
        with suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 2.0
    while leftovers and time.monotonic() < deadline:
        leftovers = [pid for pid in leftovers if _belongs(pid, b"", uid) and not _is_zombie(pid)]
        if leftovers:
            time.sleep(0.01)
    if leftovers:
        return False
    for name in os.listdir(tempfile.gettempdir()):
        path = os.path.join(tempfile.gettempdir(), name)
        with suppress(OSError):
            if name.startswith("tropd-sandbox-") and os.lstat(path).st_uid == uid and not os.path.islink(path):
                _remove_tree(path)
    return True


@functools.cache
def _uid_taken(uid: int) -> bool:
    """A uid or gid with an account or group must not be borrowed (its files and group rights would come along)."""
    for lookup in (pwd.getpwuid, grp.getgrgid):
        try:
            lookup(uid)
            return True
        except KeyError:
            pass
    return False


_UIDS = _UidPool()


@contextmanager
def _sandbox_uid(wanted: bool) -> Iterator[int | None]:
    if not wanted:
        yield None
        return
    uid, fd = _UIDS.acquire()
    try:
        yield uid
    finally:
        _UIDS.release(uid, fd)


@contextmanager
def _input_file(data: str | bytes | None) -> Iterator[IO[bytes] | int]:
    if data is None:
        yield subprocess.DEVNULL
        return
    with tempfile.TemporaryFile() as fh:
        fh.write(data.encode() if isinstance(data, str) else data)
        fh.seek(0)
        yield fh


def _read_setup_error(fd: int) -> str | None:
    """What the child wrote on its error pipe; every write end is closed by now (exec or exit)."""
    os.set_blocking(fd, False)
    try:
        data = os.read(fd, 4096)
    except BlockingIOError:
        data = b""
    return data.decode(errors="replace") if data else None


def _tail(fh: IO[bytes]) -> str:
    size = os.fstat(fh.fileno()).st_size
    fh.seek(max(0, size - TAIL_BYTES))
    return fh.read().decode("utf-8", errors="replace")


def _remove_tree(path: str) -> None:
    """``shutil.rmtree`` that also removes what a sample made read-only or unsearchable."""

    def force(func: Callable[[str], object], failed: str, _exc: object) -> None:
        # Never through a symlink: a sample may plant one to a host file (chmod follows links).
        for target in (os.path.dirname(failed), failed):
            with suppress(OSError):
                if not os.path.islink(target):
                    os.chmod(target, 0o700)
        with suppress(FileNotFoundError):
            func(failed)

    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=force)
    else:
        shutil.rmtree(path, onerror=force)
