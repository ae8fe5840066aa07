"""teacher.backend=server against a real server process on loopback (tropd_cli.serving.hf_server over the tiny
random teacher): the same steps as the colocated teacher, and a one-line refusal for each way a server can be
wrong for the run.

Where vLLM is installed, the real ``vllm serve`` is tested too (test_a_real_vllm_server_passes_the_checks).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tropd_cli.config import ModelConfig
from tropd_cli.errors import UserError
from tropd_cli.models import char_tokenizer
from tropd_cli.train.loop import train
from tropd_cli.validate import validate_train

TEACHER = {"name": "tiny-random", "tiny_layers": 4}
VOCAB = 100  # the tiny models' character vocabulary: top_k = V makes the served top-k the whole distribution


class Served:
    """A running ``python -m tropd_cli.serving.hf_server`` process and its URL."""

    def __init__(self, *args: str) -> None:
        cmd = [
            sys.executable, "-m", "tropd_cli.serving.hf_server", "--model", "tiny-random",
            "--model-config", json.dumps({"tiny_layers": 4}), "--port", "0", "--threads", "1",
            "--max-logprobs", str(VOCAB), *args,
        ]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if "http://" not in line:
            self.proc.kill()
            raise RuntimeError(f"the server did not start: {line}{self.proc.stderr.read() if self.proc.stderr else ''}")
        self.url = line.split()[-1]

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=30)


@pytest.fixture
def serve():
    started: list[Served] = []

    def start(*args: str) -> Served:
        started.append(Served(*args))
        return started[-1]

    yield start
    for s in started:
        s.stop()


def served_config(make_config, url: str, **sections):
    """The tiny config with a named student (a served teacher has no weights to cut a student from)."""
    cfg = make_config(**sections)
    cfg.student = ModelConfig(name="tiny-random", tiny_layers=2, tiny_seed=1, dtype="float32")
    cfg.teacher.backend = "server"
    cfg.teacher.server.url = url
    cfg.teacher.server.retries = 1
    cfg.teacher.server.timeout_s = 60
    cfg.heldout.size = 0
    return cfg


def local_config(make_config, **sections):
    cfg = make_config(**sections)
    cfg.student = ModelConfig(name="tiny-random", tiny_layers=2, tiny_seed=1, dtype="float32")
    cfg.heldout.size = 0
    return cfg


def without_times(history):
    return [{k: v for k, v in h.items() if not k.startswith("time_")} for h in history]


def test_a_served_teacher_takes_the_colocated_teachers_steps(make_config, tmp_path, serve):
    """Three on-policy steps (no guidance: the teacher only scores) with k = the whole vocabulary: every logged
    number, the entropy included, and the trained weights match the colocated HF teacher's to fp32 tolerance. Two
    sequences per request, two requests in flight: the batching and concurrency keep the rows in order."""
    server = serve()
    common = dict(
        steps=3,
        method={"top_k": VOCAB},
        guidance={"enabled": False},
        rollout={"batch_size": 4, "max_new_tokens": 8, "sampler_dtype": "float32"},
    )
    local = train(local_config(make_config, **common), output_dir=tmp_path / "local")
    cfg = served_config(make_config, server.url, **common)
    cfg.teacher.server.sequences_per_request, cfg.teacher.server.concurrency = 2, 2
    served = train(cfg, output_dir=tmp_path / "served")
    for a, b in zip(without_times(local.history), without_times(served.history), strict=True):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), key
    w_local = load_file(tmp_path / "local" / "checkpoint" / "model.safetensors")
    w_served = load_file(tmp_path / "served" / "checkpoint" / "model.safetensors")
    for k in w_local:
        # Adam turns fp32 noise in a near-zero gradient into up to an lr-sized step: 1e-4 is a tenth of lr = 1e-3
        torch.testing.assert_close(w_local[k], w_served[k], atol=1e-4, rtol=0)


def test_the_served_teacher_writes_guidance_prefixes(make_config, tmp_path, serve):
    """With guidance on, the prefixes come from the server (seeded per row): the run trains on them, and a second
    run against the same server writes the same prefixes (the same steps)."""
    server = serve()
    common = dict(steps=2, rollout={"batch_size": 2, "max_new_tokens": 8})
    first = train(served_config(make_config, server.url, **common), output_dir=tmp_path / "a")
    again = train(served_config(make_config, server.url, **common), output_dir=tmp_path / "b")
    assert first.history[0]["prefix_len"] > 0
    assert without_times(first.history) == without_times(again.history)


def test_a_server_that_fails_at_first_is_retried(make_config, tmp_path, serve):
    """503s for the first two completions requests (a server still loading): retried, and the run goes on."""
    server = serve("--fail-first", "2")
    cfg = served_config(make_config, server.url, steps=1, rollout={"batch_size": 2, "max_new_tokens": 4})
    cfg.teacher.server.retries = 2
    assert len(train(cfg, output_dir=tmp_path).history) == 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def refusal(cfg, tmp_path) -> str:
    with pytest.raises(UserError) as err:
        train(cfg, output_dir=tmp_path)
    message = str(err.value)
    assert "\n" not in message
    assert not (tmp_path / "checkpoint").exists()
    return message


def saved_tokenizer(tmp_path: Path, swap: tuple[str, str]) -> Path:
    """The tiny models' character tokenizer with two characters' ids swapped, saved as a directory."""
    tok = char_tokenizer()
    out = tmp_path / f"tok-{ord(swap[0])}-{ord(swap[1])}"
    tok.save_pretrained(out)
    spec = json.loads((out / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    vocab[swap[0]], vocab[swap[1]] = vocab[swap[1]], vocab[swap[0]]
    (out / "tokenizer.json").write_text(json.dumps(spec))
    return out


REFUSALS = {
    # name: (server arguments, config change, what the one line says)
    "nothing listening": (None, None, "did not answer /v1/models after 2 tries"),
    "another model": (
        (),
        lambda c: setattr(c.teacher.server, "model", "someone-else"),
        "does not serve 'someone-else'",
    ),
    # vLLM's default --max-logprobs is 20; the run's top_k 64
    "too few log-probs": (("--max-logprobs", "20"), lambda c: setattr(c.method, "top_k", 64), "--max-logprobs 64"),
    "another tokenizer": (("--tokenizer", ("a", "e")), None, "tokenizer differs"),  # the probe texts hold both
    "another vocabulary": (("--tokenizer", ("|", "~")), None, "vocabulary differs"),  # no probe text holds them
    "processed log-probs": (("--logprobs-mode", "processed"), None, "processed log-probs"),
    "not deterministic": (("--noise", "1e-5"), None, "scored one fixed sequence twice"),
    "too slow": (("--delay", "3"), lambda c: setattr(c.teacher.server, "timeout_s", 1), "after 2 tries (timed out)"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_start_up_refusals_are_one_line_each(make_config, tmp_path, serve, case):
    """Each way a server is wrong for the run is refused before the first step, in one line that names the fix."""
    args, change, message = REFUSALS[case]
    if args is None:
        url = f"http://127.0.0.1:{free_port()}"
    else:
        args = tuple(str(saved_tokenizer(tmp_path, a)) if isinstance(a, tuple) else a for a in args)
        url = serve(*args).url
    cfg = served_config(make_config, url, steps=1, rollout={"batch_size": 2, "max_new_tokens": 4})
    if change is not None:
        change(cfg)
    assert message in refusal(cfg, tmp_path / "run")


def test_a_server_that_goes_away_mid_run_is_one_line_and_the_run_resumes(make_config, tmp_path, serve):
    """The server dies after the second step: the third step's request fails after its retries with one line naming
    the URL (the checkpoints of steps 1 and 2 stay); a new server at the same address lets resume=auto finish the run."""
    server = serve()
    cfg = served_config(make_config, server.url, steps=3, save_every=1, rollout={"batch_size": 2, "max_new_tokens": 4})
    port = server.url.rsplit(":", 1)[-1]
    from tropd_cli.train.checkpoint import step_dirs
    from tropd_cli.train.loop import NoHooks

    class KillAfterFirstStep(NoHooks):
        def on_step(self, step, metrics):
            if step == 1:
                server.stop()

    with pytest.raises(UserError) as err:
        train(cfg, output_dir=tmp_path, hooks=KillAfterFirstStep())
    assert "did not answer /v1/completions after 2 tries" in str(err.value) and server.url in str(err.value)
    assert "\n" not in str(err.value)
    assert [p.name for p in step_dirs(tmp_path)] == ["step_000002", "step_000001"]  # on_step(1): the 2nd step
    serve("--port", port)
    cfg.resume = "auto"
    assert len(train(cfg, output_dir=tmp_path).history) == 3


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c: setattr(c.teacher, "backend", "remote"), "teacher.backend='remote' is not an option"),
        (lambda c: setattr(c.teacher.server, "url", "127.0.0.1:8000"), "must be an http:// or https:// address"),
        (lambda c: setattr(c.teacher.server, "timeout_s", 0), "teacher.server.timeout_s=0 must be positive"),
        (lambda c: setattr(c.teacher.server, "concurrency", 0), "teacher.server.concurrency=0 must be >= 1"),
        (lambda c: setattr(c.student, "from_teacher", True), "student.from_teacher needs the teacher's weights"),
        (lambda c: setattr(c.method, "name", "gkd"), "method=gkd needs the teacher's full distribution"),
        (lambda c: setattr(c.rollout, "temperature", 0.7), "scores at temperature 1 only"),
        (lambda c: setattr(c.distributed, "shard_teacher", True), "no local teacher to shard"),
    ],
)
def test_settings_a_served_teacher_cannot_take_are_one_line_errors(make_config, change, message):
    cfg = served_config(make_config, "http://127.0.0.1:9")
    change(cfg)
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(".", r"\.")) as err:
        validate_train(cfg)
    assert "\n" not in str(err.value)


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("vllm") is None or shutil.which("vllm") is None, reason="needs vLLM (vllm serve)"
)
def test_a_real_vllm_server_passes_the_checks_and_scores_like_hf(tmp_path, make_config):
    """``vllm serve`` of the tiny teacher saved as a checkpoint: the start-up checks pass and one step runs."""
    from tropd_cli.models import load_model, save_checkpoint

    loaded = load_model(
        ModelConfig(**TEACHER, dtype="float32"), device=torch.device("cpu"), cache_dir=tmp_path, frozen=True
    )
    save_checkpoint(loaded.model, loaded.tokenizer, tmp_path / "teacher")
    port = free_port()
    proc = subprocess.Popen(
        ["vllm", "serve", str(tmp_path / "teacher"), "--port", str(port), "--max-logprobs", str(VOCAB),
         "--dtype", "float32", "--served-model-name", "teacher"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.time() + 600
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(2)
        cfg = served_config(make_config, f"http://127.0.0.1:{port}", steps=1, method={"top_k": 20})
        cfg.teacher.server.retries = 30
        assert len(train(cfg, output_dir=tmp_path / "run").history) == 1
    finally:
        proc.kill()


def test_a_run_resumes_against_its_teacher_at_another_address(make_config):
    """The fingerprint a resume compares holds the served model, not its address or the transport settings."""
    from tropd_cli.train.checkpoint import fingerprint

    a = served_config(make_config, "http://10.0.0.1:8000")
    b = served_config(make_config, "http://10.0.0.2:9000")
    b.teacher.server.concurrency, b.teacher.server.timeout_s = 2, 30
    assert fingerprint(a) == fingerprint(b)
    b.teacher.server.model = "another-teacher"
    assert fingerprint(a) != fingerprint(b)
    assert fingerprint(a) != fingerprint(local_config(make_config))


def test_sft_targets_from_a_served_teacher(make_config, tmp_path, serve):
    """method=sft method.sft_source=teacher: the server writes the targets (greedy here, so they are the served
    model's argmax continuations) and the student trains on them."""
    server = serve()
    cfg = served_config(
        make_config, server.url, steps=2, method={"name": "sft", "sft_source": "teacher"},
        rollout={"batch_size": 2, "max_new_tokens": 6, "temperature": 1.0},
    )  # fmt: skip
    history = train(cfg, output_dir=tmp_path).history
    assert len(history) == 2 and history[0]["tokens"] > 0


def test_held_out_signals_are_off_with_one_warning(make_config, tmp_path, serve, caplog):
    """heldout.size > 0 with a served teacher: the run goes on without held-out signals and says so once."""
    server = serve()
    cfg = served_config(make_config, server.url, steps=1, rollout={"batch_size": 2, "max_new_tokens": 4})
    cfg.heldout.size = 4
    with caplog.at_level("WARNING", logger="tropd_cli.train.heldout"):
        history = train(cfg, output_dir=tmp_path).history
    assert not any(k.startswith("heldout/") for k in history[0])
    assert caplog.text.count("held-out signals are off") == 1
