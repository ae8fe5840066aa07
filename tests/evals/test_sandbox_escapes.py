"""The sandbox's Python guard (the mode without root or namespaces) against the escapes an outside probe
found (issue 15, item 2), and the cleanup's refusal to follow symlinks. The guard mode is forced here with
``Isolation(own_uid=False, namespaces=False)``, whatever this machine could do."""

from __future__ import annotations

import os
import stat
import sys
import uuid

import pytest

from tropd_cli.evals import sandbox
from tropd_cli.evals.sandbox import Isolation, run_program

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the sandbox needs Linux")

GUARD = Isolation(own_uid=False, namespaces=False)


def guarded(code: str):
    return run_program(code, timeout_s=10.0, isolation=GUARD)


def test_fork_exec_cannot_start_a_shell(tmp_path):
    marker = tmp_path / f"escaped-{uuid.uuid4().hex}"
    code = f"import _posixsubprocess, os\nargs = [b'/bin/sh', b'-c', b'echo pwned > {marker}']\nprint('imported')\n"
    result = guarded(code)
    assert not result.passed and "importing _posixsubprocess" in result.stderr_tail
    assert not marker.exists()


def test_the_evaluators_environment_is_not_readable(monkeypatch):
    monkeypatch.setenv("TROPD_TEST_SECRET", "s3cr3t-" + uuid.uuid4().hex)
    code = f"data = open('/proc/{os.getpid()}/environ', 'rb').read()\nprint(data.decode(errors='replace'))\n"
    result = guarded(code)
    assert not result.passed and "another process" in result.stderr_tail
    assert os.environ["TROPD_TEST_SECRET"] not in result.stdout_tail


def test_sqlite_and_special_files_stay_in_the_work_dir(tmp_path):
    db, node, fifo = tmp_path / "escape.db", tmp_path / "node", tmp_path / "fifo"
    code = (
        "import os, sqlite3\n"
        f"for attempt in (lambda: sqlite3.connect({str(db)!r}), lambda: os.mknod({str(node)!r}),\n"
        f"                lambda: os.mkfifo({str(fifo)!r})):\n"
        "    try:\n"
        "        attempt()\n"
        "        print('made')\n"
        "    except PermissionError as exc:\n"
        "        print('refused', exc)\n"
        "sqlite3.connect('inside.db').execute('create table t (x)')  # the work dir is fine\n"
        "print('inside ok')\n"
    )
    result = guarded(code)
    assert result.passed, result.stderr_tail
    assert result.stdout_tail.count("refused") == 3 and "made" not in result.stdout_tail
    assert not db.exists() and not node.exists() and not fifo.exists()


def test_cleanup_never_follows_a_planted_symlink(tmp_path, monkeypatch):
    host = tmp_path / "host.txt"
    host.write_text("keep")
    host.chmod(0o600)
    tree = tmp_path / "work"
    (tree / "d").mkdir(parents=True)
    link = tree / "d" / "link"
    link.symlink_to(host)
    real_unlink = os.unlink
    failed = []

    def unlink(path, *args, **kwargs):  # the first removal of the link fails, as in an unwritable directory
        if str(path).endswith("link") and not failed:
            failed.append(path)
            raise PermissionError(13, "Permission denied", str(path))
        return real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", unlink)
    sandbox._remove_tree(str(tree))
    assert failed and not tree.exists()
    assert stat.S_IMODE(host.stat().st_mode) == 0o600 and host.read_text() == "keep"


def test_ordinary_programs_still_run_under_the_guard():
    result = guarded("import json, math, collections\nprint(json.dumps(sorted(collections.Counter('aab'))))\n")
    assert result.passed and result.stdout_tail.strip() == '["a", "b"]'


def test_root_without_its_own_uid_gets_one_fork_not_a_bomb():
    code = (
        "import os\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    os._exit(0)\n"
        "os.waitpid(pid, 0)\n"
        "print('first fork ok')\n"
        "os.fork()\n"
    )
    result = guarded(code)
    if os.geteuid() != 0:
        pytest.skip("the fork guard binds only root (others have RLIMIT_NPROC)")
    assert "first fork ok" in result.stdout_tail and "os.fork is not allowed" in result.stderr_tail


@pytest.mark.skipif(os.geteuid() != 0, reason="own sandbox uids need root")
def test_leftovers_of_a_killed_evaluator_are_reclaimed_with_their_uid(tmp_path):
    """A process a sample double-forked outlives an evaluator killed with SIGKILL (nothing is left to kill it);
    the next evaluator that takes that uid kills it and removes the work dir it owned."""
    import subprocess
    import tempfile

    uid = sandbox.FIRST_SANDBOX_UID + sandbox.SANDBOX_UIDS - 1
    survivor = subprocess.Popen(["sleep", "60"], user=uid, group=uid)
    workdir = tempfile.mkdtemp(prefix="tropd-sandbox-")
    os.chown(workdir, uid, uid)
    try:
        assert sandbox._reclaim(uid)
        assert survivor.wait(timeout=5) == -9 and not os.path.exists(workdir)
    finally:
        survivor.kill()
        if os.path.exists(workdir):
            os.rmdir(workdir)


def test_the_guard_mode_is_said_in_one_line_at_start(caplog):
    import logging

    from tropd_cli.evals.code import announce_isolation

    announce_isolation.cache_clear()
    with caplog.at_level(logging.WARNING):
        announce_isolation(Isolation(own_uid=True, namespaces=True))
        announce_isolation(GUARD)
        announce_isolation(GUARD)  # once per process
    lines = [r.getMessage() for r in caplog.records if "code eval without root" in r.getMessage()]
    assert len(lines) == 1 and "threat-model" in lines[0]
