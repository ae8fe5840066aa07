"""The code sandbox with well-behaved and hostile programs: real subprocesses, about 10 s in all.

Each hostile sample must end as a failure, leave no process behind, change nothing outside its
work dir, and leave the evaluator (this pytest process) running. Which layers stop it depends on the
machine (see ``detect_isolation().describe()``); the outcome checked here must not.
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from tropd_cli.evals.sandbox import detect_isolation, run_many, run_program

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the sandbox needs Linux")


def live_group_members(pgid: int) -> list[int]:
    """Processes (zombies aside) whose process group is ``pgid``."""
    members = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            fields = Path(f"/proc/{name}/stat").read_bytes().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != b"Z" and int(fields[2]) == pgid:
            members.append(int(name))
    return members


def is_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != b"Z"


def test_isolation_is_described():
    text = detect_isolation().describe()
    assert "own uid per sample" in text and "namespaces" in text


def test_passing_program():
    result = run_program("print(1 + 1)")
    assert result.passed and result.status == "ok" and result.returncode == 0
    assert result.stdout_tail == "2\n" and result.stderr_tail == ""
    assert 0 < result.seconds < 5


def test_stdin_reaches_the_program():
    assert run_program("print(input()[::-1])", stdin="abc").stdout_tail == "cba\n"


def test_assertion_failure():
    result = run_program("assert 1 == 2, 'boom'")
    assert not result.passed and result.status == "failed" and result.returncode == 1
    assert "AssertionError: boom" in result.stderr_tail


def test_syntax_error():
    result = run_program("def f(:\n    pass\n")
    assert not result.passed and result.status == "failed"
    assert "SyntaxError" in result.stderr_tail


def test_exit_code_125_is_the_program_s_not_a_setup_failure():
    result = run_program("import sys\nsys.exit(125)")
    assert result.status == "failed" and result.returncode == 125


def test_output_is_kept_as_a_bounded_tail():
    result = run_program("print('x' * 1_000_000)\nprint('end')")
    assert result.passed and result.stdout_tail.endswith("x\nend\n") and len(result.stdout_tail) <= 4096


def test_work_dir_is_writable_and_removed_afterwards():
    code = "import os\nopen('inside.txt', 'w').write('ok')\nprint(os.getcwd())\nprint(open('inside.txt').read())"
    result = run_program(code)
    assert result.passed, result.stderr_tail
    cwd, content = result.stdout_tail.split()
    assert content == "ok" and not Path(cwd).exists()


def test_infinite_loop_times_out_and_its_group_is_gone():
    code = "import os, sys\nprint(os.getpgid(0), os.getcwd(), file=sys.stderr, flush=True)\nwhile True:\n    pass\n"
    t0 = time.perf_counter()
    result = run_program(code, timeout_s=1.0)
    elapsed = time.perf_counter() - t0
    assert result.status == "timeout" and not result.passed
    assert elapsed < 1.0 + 2.0
    pgid, cwd = result.stderr_tail.split()
    assert live_group_members(int(pgid)) == []
    assert not Path(cwd).exists()


def test_fork_bomb_is_contained_and_leaves_no_process():
    code = (
        "import os, sys\n"
        "print(os.getpgid(0), file=sys.stderr, flush=True)\n"
        "while True:\n"
        "    try:\n"
        "        if os.fork() == 0:\n"
        "            print(os.getpid(), flush=True)\n"
        "    except OSError:\n"
        "        pass\n"
    )
    t0 = time.perf_counter()
    result = run_program(code, timeout_s=3.0, max_processes=16)
    elapsed = time.perf_counter() - t0
    assert result.status == "timeout" and not result.passed
    assert elapsed < 3.0 + 2.0
    assert live_group_members(int(result.stderr_tail.split()[0])) == []
    children = {int(line) for line in result.stdout_tail.split()[1:]}  # the first may be cut by the tail
    assert not any(is_alive(pid) for pid in children)
    if detect_isolation().own_uid:  # RLIMIT_NPROC counts exactly the sample's own processes
        assert len(children) < 16
    # the machine is still responsive: the next sample starts and ends at once
    after = run_program("print('alive')")
    assert after.passed and after.seconds < 2.0


def test_huge_allocation_fails_under_the_memory_limit():
    result = run_program("buffer = bytearray(50 * 2**30)\nprint('allocated')", memory_mb=512)
    assert result.status == "failed" and not result.passed
    assert "MemoryError" in result.stderr_tail and "allocated" not in result.stdout_tail


def test_writing_outside_the_work_dir_changes_nothing(tmp_path):
    tag = uuid.uuid4().hex
    targets = [
        tmp_path / "escape.txt",
        Path(tempfile.gettempdir()) / f"tropd-escape-{tag}.txt",
        Path("/var/tmp") / f"tropd-escape-{tag}.txt",
        Path.home() / f"tropd-escape-{tag}.txt",
    ]
    code = (
        "import os\n"
        f"for path in {[str(t) for t in targets]!r} + ['../tropd-escape-rel-{tag}.txt']:\n"
        "    try:\n"
        "        with open(path, 'w') as fh:\n"
        "            fh.write('escaped')\n"
        "    except OSError as exc:\n"
        "        print(type(exc).__name__, path)\n"
        "try:\n"
        f"    os.makedirs({str(tmp_path / 'made')!r})\n"
        "except OSError as exc:\n"
        "    print(type(exc).__name__)\n"
    )
    try:
        run_program(code)
        relative = Path(tempfile.gettempdir()) / f"tropd-escape-rel-{tag}.txt"
        assert [t for t in [*targets, relative, tmp_path / "made"] if t.exists()] == []
    finally:
        for path in targets:
            path.unlink(missing_ok=True)


def test_deleting_files_outside_the_work_dir_fails(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    shared_victim = Path(tempfile.gettempdir()) / f"tropd-victim-{uuid.uuid4().hex}.txt"
    shared_victim.write_text("keep")
    shared_victim.chmod(0o666)
    code = (
        "import os, shutil\n"
        f"for path in [{str(victim)!r}, {str(shared_victim)!r}]:\n"
        "    try:\n"
        "        os.remove(path)\n"
        "    except OSError as exc:\n"
        "        print(type(exc).__name__)\n"
        "    try:\n"
        "        open(path, 'w').close()\n"
        "    except OSError as exc:\n"
        "        print(type(exc).__name__)\n"
        f"shutil.rmtree({str(tmp_path)!r}, ignore_errors=True)\n"
    )
    try:
        run_program(code)
        assert victim.read_text() == "keep"
        assert shared_victim.read_text() == "keep"
    finally:
        shared_victim.unlink(missing_ok=True)


def test_socket_to_loopback_fails():
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port), timeout=2):  # reachable from outside the sandbox
            server.accept()[0].close()
        code = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\nprint('connected')"
        result = run_program(code)
        assert result.status == "failed" and "connected" not in result.stdout_tail
        server.settimeout(0.3)
        with pytest.raises(TimeoutError):
            server.accept()


def test_killing_the_parent_fails_and_the_evaluator_survives():
    code = (
        "import os, signal, time\n"
        "parent = os.getppid()\n"
        "for kill in (lambda: os.kill(parent, signal.SIGKILL), lambda: os.killpg(os.getpgid(parent), signal.SIGKILL)):\n"
        "    try:\n"
        "        kill()\n"
        "    except OSError as exc:\n"
        "        print(type(exc).__name__)\n"
        "time.sleep(0.5)\n"
        "raise SystemExit(3)\n"
    )
    result = run_program(code)
    assert not result.passed and result.status in ("failed", "killed")
    assert is_alive(os.getpid())
    assert run_program("print('still scoring')").passed


def test_run_many_runs_in_parallel_and_keeps_order():
    sleeps = [0.8, 0.6, 0.4, 0.2]
    programs = [f"import time\ntime.sleep({s})\nprint({i})" for i, s in enumerate(sleeps)]
    t0 = time.perf_counter()
    results = run_many(programs, workers=4)
    elapsed = time.perf_counter() - t0
    assert [r.stdout_tail.strip() for r in results] == ["0", "1", "2", "3"]
    assert all(r.passed for r in results)
    assert elapsed < sum(sleeps)
