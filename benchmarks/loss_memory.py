"""Loss-path peak memory and time (forward + backward): tropd's chunked scoring vs a full log-softmax vs TRL.

Three ways to turn final hidden states ``[N, H]`` and lm_head weights ``[V, H]`` (student and teacher)
into a distillation loss and its gradients:

- ``tropd``: ``scoring.teacher_scores`` (top-k) + ``scoring.student_scores`` (chunked, recomputing
  backward) + ``losses.tropd_loss(outlier="fkl")`` with a Bernoulli trust mask + ``masked_mean``.
- ``naive``: the same loss from full ``[N, V]`` logits and ``log_softmax`` (teacher and student).
- ``trl``: TRL's ``GKDTrainer.generalized_jsd_loss`` on the full student and teacher logits.

Every (path, size) is measured in a fresh child process, so peaks never mix and running out of
memory ends only that child. Each child caps its own address space (``RLIMIT_AS``) so an over-large
size fails with an allocation error instead of waking the kernel's OOM killer on a shared machine.

Usage::

    python benchmarks/loss_memory.py                  # the full run (about an hour on 2 cores)
    python benchmarks/loss_memory.py --sizes 1 2 --paths tropd naive
    python benchmarks/loss_memory.py --merge --paths tropd --sizes 2    # re-measure rows, keep the others
    python benchmarks/loss_memory.py --render-only                      # rewrite the outputs from results.json
    python benchmarks/loss_memory.py --quick --out-json /tmp/r.json --out-md /tmp/b.md   # seconds
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from _report import environment, update_results, write_section

ROOT = Path(__file__).resolve().parents[1]
RESULTS_JSON = ROOT / "benchmarks" / "results.json"
BENCHMARKS_MD = ROOT / "docs" / "benchmarks.md"
MD_START, MD_END = "<!-- loss-memory:start -->", "<!-- loss-memory:end -->"
GIB = 2**30
FP32 = 4
PATHS = ("tropd", "naive", "trl")


@dataclass(frozen=True)
class Shape:
    """Model dimensions; a size ``b`` means ``b`` sequences of ``seq_len`` tokens (N = b * seq_len)."""

    vocab: int
    hidden: int
    top_k: int
    seq_len: int


FULL = Shape(vocab=151_936, hidden=1536, top_k=64, seq_len=2048)  # Qwen2.5-1.5B's lm_head, k = 64
QUICK = Shape(vocab=16_384, hidden=64, top_k=8, seq_len=32)  # big enough that buffers leave the malloc heap


@dataclass(frozen=True)
class Job:
    path: str
    batch: int
    chunk_size: int
    shape: Shape
    cap_bytes: int  # the child's allowance above its inputs
    repeat_below_s: float  # repeat (median of 3 after a warm-up) only when one run is this fast
    threads: int | None = None  # torch's intra-op threads; None = torch's default (all cores)
    seed: int = 0

    @property
    def tokens(self) -> int:
        return self.batch * self.shape.seq_len


# ---------------------------------------------------------------------------------------------
# Peak memory of this process


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def rss_bytes() -> int:
    try:
        return _status_kib("VmRSS") * 1024
    except (OSError, KeyError):
        import psutil

        return psutil.Process().memory_info().rss


def _reset_hwm() -> bool:
    """Writing 5 to clear_refs resets the kernel's resident high-water mark (VmHWM) to the current RSS."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakMeter:
    """Peak resident memory (bytes) since :meth:`reset`.

    Preferred: the kernel's own high-water mark (VmHWM), exact and free. Where clear_refs cannot be
    written (no /proc, a locked-down container) a thread samples RSS every millisecond instead;
    torch releases the GIL inside its kernels, so the sampler keeps running during them.
    """

    def __init__(self) -> None:
        self.method = "VmHWM" if _reset_hwm() else "sampled"
        self._peak = 0
        self._stop = threading.Event()
        if self.method == "sampled":
            threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            self._peak = max(self._peak, rss_bytes())

    def reset(self) -> None:
        if self.method == "VmHWM":
            _reset_hwm()
        self._peak = rss_bytes()

    def peak(self) -> int:
        if self.method == "VmHWM":
            return _status_kib("VmHWM") * 1024
        return max(self._peak, rss_bytes())

    def close(self) -> None:
        self._stop.set()


# ---------------------------------------------------------------------------------------------
# The three loss paths (run in the child)


def make_inputs(shape: Shape, batch: int, seed: int) -> dict[str, Any]:
    """Student/teacher hidden states and lm_heads, sampled ids and the trust-region noise, fp32, seeded."""
    import torch

    g = torch.Generator().manual_seed(seed)
    n, h, v = batch * shape.seq_len, shape.hidden, shape.vocab
    scale = h**-0.5  # logits of unit scale, like a trained lm_head's
    return {
        "batch": batch,
        "top_k": shape.top_k,
        "student_hidden": torch.randn(n, h, generator=g).requires_grad_(),
        "student_weight": (torch.randn(v, h, generator=g) * scale).requires_grad_(),
        "teacher_hidden": torch.randn(n, h, generator=g),
        "teacher_weight": torch.randn(v, h, generator=g) * scale,
        "token_ids": torch.randint(0, v, (n,), generator=g),
        "uniform": torch.rand(n, generator=g),  # the Bernoulli trust mask's noise, drawn once
    }


def _tropd_objective(x: dict[str, Any], logp, student_topk_logp, teacher_logp, teacher_topk_logp):
    """tropd_loss(outlier='fkl') with a Bernoulli trust mask, reduced once by masked_mean (as the trainer does)."""
    import torch

    from tropd_cli.train import losses

    b = x["batch"]
    logp = logp.view(b, -1)
    old_logp = logp.detach()  # first PPO epoch: the rollout policy is the current one
    teacher_logp = teacher_logp.view(b, -1)
    reward = losses.k1_reward(old_logp, teacher_logp)
    trust_mask = losses.trust_region_mask(reward, kind="bernoulli", uniform=x["uniform"].view(b, -1))
    per_token = losses.tropd_loss(
        logp,
        old_logp,
        teacher_logp,
        student_topk_logp.view(b, logp.shape[1], -1),
        teacher_topk_logp.view(b, logp.shape[1], -1),
        trust_mask=trust_mask,
        prefix_mask=torch.zeros_like(trust_mask),
        outlier="fkl",
    )
    return losses.masked_mean(per_token, torch.ones_like(trust_mask))


def loss_tropd(x: dict[str, Any], chunk_size: int):
    from tropd_cli.train.scoring import student_scores, teacher_scores

    teacher = teacher_scores(
        x["teacher_hidden"], x["teacher_weight"], x["token_ids"], top_k=x["top_k"], chunk_size=chunk_size
    )
    logp, student_topk_logp, _entropy = student_scores(
        x["student_hidden"], x["student_weight"], x["token_ids"], teacher.topk_ids, chunk_size=chunk_size
    )
    return _tropd_objective(x, logp, student_topk_logp, teacher.logp, teacher.topk_logp)


def loss_naive(x: dict[str, Any], chunk_size: int):
    """The same objective from full [N, V] log-softmaxes; each logits tensor dies as soon as it is used."""
    import torch

    ids = x["token_ids"][:, None]
    with torch.no_grad():
        teacher_logprobs = torch.log_softmax(x["teacher_hidden"] @ x["teacher_weight"].t(), dim=-1)
        teacher_logp = teacher_logprobs.gather(1, ids).squeeze(1)
        teacher_topk_logp, topk_ids = torch.topk(teacher_logprobs, x["top_k"], dim=-1)
        del teacher_logprobs
    student_logprobs = torch.log_softmax(x["student_hidden"] @ x["student_weight"].t(), dim=-1)
    logp = student_logprobs.gather(1, ids).squeeze(1)
    student_topk_logp = student_logprobs.gather(1, topk_ids)
    return _tropd_objective(x, logp, student_topk_logp, teacher_logp, teacher_topk_logp)


def _trl_jsd():
    """TRL's ``GKDTrainer.generalized_jsd_loss``; its verbatim formula when trl is not installed."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    try:
        from trl.experimental.gkd import GKDTrainer
    except ImportError:
        try:
            from trl import GKDTrainer  # trl < 0.29 kept it at the top level
        except ImportError:
            return _vendored_generalized_jsd_loss, "vendored copy of trl 1.16.0's formula (trl not installed)"
    return GKDTrainer.generalized_jsd_loss, f"trl {metadata.version('trl')} GKDTrainer.generalized_jsd_loss"


def _vendored_generalized_jsd_loss(
    student_logits, teacher_logits, labels=None, beta=0.5, temperature=1.0, reduction="batchmean"
):
    """Copied from trl 1.16.0 (Apache-2.0), trl/experimental/gkd/gkd_trainer.py, GKDTrainer.generalized_jsd_loss.

    Only the docstring and the unused ``num_items_in_batch`` branch are left out; the arithmetic, and
    so the tensors it allocates, are TRL's.
    """
    import torch
    import torch.nn.functional as F

    student_logits = student_logits / temperature
    teacher_logits = teacher_logits / temperature
    student_log_probs = F.log_softmax(student_logits, dim=-1)
    teacher_log_probs = F.log_softmax(teacher_logits, dim=-1)
    if beta == 0:
        jsd = F.kl_div(student_log_probs, teacher_log_probs, reduction="none", log_target=True)
    elif beta == 1:
        jsd = F.kl_div(teacher_log_probs, student_log_probs, reduction="none", log_target=True)
    else:
        beta = torch.tensor(beta, dtype=student_log_probs.dtype, device=student_log_probs.device)
        mixture_log_probs = torch.logsumexp(
            torch.stack([student_log_probs + torch.log1p(-beta), teacher_log_probs + torch.log(beta)]),
            dim=0,
        )
        kl_teacher = F.kl_div(mixture_log_probs, teacher_log_probs, reduction="none", log_target=True)
        kl_student = F.kl_div(mixture_log_probs, student_log_probs, reduction="none", log_target=True)
        jsd = beta * kl_teacher + (1 - beta) * kl_student
    if labels is not None:
        mask = labels != -100
        jsd = jsd[mask]
    if reduction == "batchmean":
        denom = mask.sum().clamp_min(1) if labels is not None else max(jsd.size(0), 1)
        return jsd.sum() / denom
    elif reduction == "sum":
        return jsd.sum()
    elif reduction == "mean":
        return jsd.mean()
    else:
        return jsd


def loss_trl(x: dict[str, Any], chunk_size: int):
    """As GKDTrainer.compute_loss calls it: full student and teacher logits, labels, its default beta."""
    import torch

    jsd, _ = _trl_jsd()
    b = x["batch"]
    student_logits = (x["student_hidden"] @ x["student_weight"].t()).view(b, -1, x["student_weight"].shape[0])
    with torch.no_grad():
        teacher_logits = (x["teacher_hidden"] @ x["teacher_weight"].t()).view_as(student_logits)
    return jsd(student_logits, teacher_logits, labels=x["token_ids"].view(b, -1), beta=0.5)


LOSSES = {"tropd": loss_tropd, "naive": loss_naive, "trl": loss_trl}


# ---------------------------------------------------------------------------------------------
# Child: one (path, size), reported as one JSON line


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, MemoryError) or "can't allocate memory" in str(exc) or "not enough memory" in str(exc)


def _cap_address_space(extra: int) -> None:
    """Refuse allocations beyond ``extra`` bytes over what the process maps now (a clean OOM, not a killed box)."""
    vm_size = _status_kib("VmSize") * 1024
    resource.setrlimit(resource.RLIMIT_AS, (vm_size + extra, resource.getrlimit(resource.RLIMIT_AS)[1]))


def source_sha() -> str:
    """Fingerprint of the project code a path runs (scoring and losses), so rows from different versions show."""
    import hashlib

    from tropd_cli.train import losses, scoring

    digest = hashlib.sha256()
    for module in (scoring, losses):
        digest.update(Path(module.__file__).read_bytes())
    return digest.hexdigest()[:12]


def measure(job: Job) -> dict[str, Any]:
    import torch

    fn = LOSSES[job.path]
    if job.threads:
        torch.set_num_threads(job.threads)
    if job.path == "trl":
        _trl_jsd()  # import trl (and transformers) before the baseline
    torch.manual_seed(job.seed)
    x = make_inputs(job.shape, job.batch, job.seed)
    params = (x["student_hidden"], x["student_weight"])
    # One tiny op of each kind first, so lazily loaded kernels don't count as the loss path's memory.
    warm = make_inputs(Shape(vocab=64, hidden=8, top_k=min(job.shape.top_k, 8), seq_len=4), 1, job.seed)
    fn(warm, 2).backward()
    del warm
    gc.collect()
    baseline = rss_bytes()
    meter = PeakMeter()
    meter.reset()
    _cap_address_space(job.cap_bytes)
    times: list[float] = []
    loss_value = float("nan")
    try:
        while True:
            for p in params:
                p.grad = None
            t0 = time.perf_counter()
            loss = fn(x, job.chunk_size)
            loss.backward()
            times.append(time.perf_counter() - t0)
            loss_value = loss.item()
            del loss
            # A warm-up then three timed runs when a run is short; the single (cold) run when it is not.
            if len(times) == 1 and times[0] >= job.repeat_below_s:
                break
            if len(times) == 4:
                times = times[1:]
                break
    except (RuntimeError, MemoryError) as exc:
        if not _is_oom(exc):
            raise
        peak = meter.peak()
        return {
            "status": "failed",
            "note": f"out of memory under the {job.cap_bytes / GIB:.1f} GiB cap: {str(exc).splitlines()[0][:160]}",
            "baseline_gib": baseline / GIB,
            "peak_extra_gib_before_failure": (peak - baseline) / GIB,
            "tropd_cli_sha": source_sha(),
            "memory_method": meter.method,
        }
    peak = meter.peak()
    meter.close()
    grad_norm = float(torch.linalg.vector_norm(params[1].grad))
    return {
        "status": "ok",
        "trl_source": _trl_jsd()[1] if job.path == "trl" else None,
        "tropd_cli_sha": source_sha(),
        "baseline_gib": baseline / GIB,
        "peak_gib": peak / GIB,
        "peak_extra_gib": (peak - baseline) / GIB,
        "seconds": statistics.median(times),
        "runs": len(times),
        "loss": loss_value,
        "weight_grad_norm": grad_norm,
        "memory_method": meter.method,
        "threads": torch.get_num_threads(),
    }


def child_main(spec: str) -> None:
    raw = json.loads(spec)
    job = Job(**{**raw, "shape": Shape(**raw["shape"])})
    print("RESULT " + json.dumps(measure(job)), flush=True)


# ---------------------------------------------------------------------------------------------
# Parent: estimate, run one child at a time, summarise, write JSON and Markdown


def estimate_bytes(path: str, n: int, shape: Shape, chunk_size: int) -> int:
    """Rough peak extra memory, fitted to this benchmark's measurements on the full shapes (1x-4x2048).

    ``NV`` is one fp32 [N, V] tensor, ``VH`` one [V, H]. tropd: the lm_head gradient and a few
    chunk-sized logits buffers (with a margin). naive: the lm_head gradient and
    about 2.8 [N, V] buffers (log-softmax, its gradient, the gathers' scatter buffers). TRL: about 16
    [N, V] tensors alive at once (logits, temperature copies, two log-softmaxes, the stacked mixture,
    kl_div terms and their saved exps, the masked copy). Used only to skip sizes that clearly cannot fit.
    """
    nv, vh = n * shape.vocab * FP32, shape.vocab * shape.hidden * FP32
    chunk = min(chunk_size, n) * shape.vocab * FP32
    per_token = n * (2 * shape.hidden + 8 * shape.top_k) * FP32
    if path == "tropd":
        return vh + 3 * chunk + per_token
    if path == "naive":
        return vh + int(2.8 * nv) + per_token
    return vh + 16 * nv + per_token


def mem_available() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import psutil

    return psutil.virtual_memory().available


def run_job(job: Job, timeout_s: float) -> dict[str, Any]:
    row: dict[str, Any] = {
        "path": job.path,
        "batch": job.batch,
        "seq_len": job.shape.seq_len,
        "tokens": job.tokens,
        "chunk_size": job.chunk_size if job.path == "tropd" else None,
        "estimate_gib": estimate_bytes(job.path, job.tokens, job.shape, job.chunk_size) / GIB,
        "cap_gib": job.cap_bytes / GIB,
    }
    # Skip only what clearly cannot fit; borderline sizes run and may fail under the cap.
    if row["estimate_gib"] > 1.15 * row["cap_gib"]:
        return {
            **row,
            "status": "skipped",
            "note": f"would need ~{row['estimate_gib']:.1f} GiB > {row['cap_gib']:.1f} GiB",
        }
    spec = json.dumps({**asdict(job), "shape": asdict(job.shape)})
    env = {**os.environ, "TRL_EXPERIMENTAL_SILENCE": "1", "TOKENIZERS_PARALLELISM": "false"}
    try:
        proc = subprocess.run(
            [sys.executable, __file__, "--child", spec], capture_output=True, text=True, timeout=timeout_s, env=env
        )
    except subprocess.TimeoutExpired:
        return {**row, "status": "failed", "note": f"timed out after {timeout_s:.0f} s"}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return {**row, **json.loads(line[len("RESULT ") :])}
    why = f"killed by signal {-proc.returncode}" if proc.returncode < 0 else f"exit code {proc.returncode}"
    tail = proc.stderr.strip().splitlines()[-1:] or [""]
    return {**row, "status": "failed", "note": f"child {why} (out of memory?) {tail[0][:160]}".strip()}


def plan(args: argparse.Namespace, shape: Shape, cap: int) -> list[Job]:
    jobs = [
        Job(path, batch, args.chunk_size, shape, cap, args.repeat_below, args.threads)
        for batch in args.sizes
        for path in args.paths
        if path == "tropd" or batch in args.baseline_sizes
    ]
    if "tropd" in args.paths:
        for chunk in args.extra_chunks:
            for batch in sorted({2 if 2 in args.sizes else args.sizes[0], max(args.sizes)}):
                jobs.append(Job("tropd", batch, chunk, shape, cap, args.repeat_below, args.threads))
    return jobs


def _ok(rows: list[dict[str, Any]], path: str, chunk: int | None = None) -> dict[int, dict[str, Any]]:
    return {
        r["batch"]: r
        for r in rows
        if r["path"] == path and r["status"] == "ok" and (chunk is None or r["chunk_size"] == chunk)
    }


def grads_gib(shape: Shape, batch: int) -> float:
    """The gradients every path must hold: the student lm_head's [V, H] and the hidden states' [N, H]."""
    return (shape.vocab + batch * shape.seq_len) * shape.hidden * FP32 / GIB


def summarise(rows: list[dict[str, Any]], shape: Shape, chunk_size: int) -> dict[str, Any]:
    """The three target numbers (see ``docs/benchmarks.md`` for their definitions)."""
    tropd = _ok(rows, "tropd", chunk_size)
    summary: dict[str, Any] = {}
    for other in ("naive", "trl"):
        both = sorted(set(tropd) & set(_ok(rows, other)))
        if both:
            b = both[-1]
            mine, theirs, grads = tropd[b]["peak_extra_gib"], _ok(rows, other)[b]["peak_extra_gib"], grads_gib(shape, b)
            summary[f"ratio_vs_{other}"] = mine / theirs
            summary[f"ratio_vs_{other}_tokens"] = b * shape.seq_len
            # Working memory only: what is left once the unavoidable gradients are taken out of both.
            summary[f"ratio_vs_{other}_excl_grads"] = (mine - grads) / (theirs - grads)
    all_fit = sorted(set(tropd) & set(_ok(rows, "naive")) & set(_ok(rows, "trl")))
    if all_fit:
        b = all_fit[-1]
        summary["all_paths_fit_tokens"] = b * shape.seq_len
        summary["all_fit_ratio_vs_naive"] = tropd[b]["peak_extra_gib"] / _ok(rows, "naive")[b]["peak_extra_gib"]
        summary["all_fit_ratio_vs_trl"] = tropd[b]["peak_extra_gib"] / _ok(rows, "trl")[b]["peak_extra_gib"]
    if len(tropd) >= 2:
        small = 2 if 2 in tropd else min(tropd)
        large = max(tropd)
        if large > small:
            # The student hidden states' gradient is [N, H] like the hidden states themselves: it must grow.
            hidden_growth = (large - small) * shape.seq_len * shape.hidden * FP32 / GIB
            lo, hi = tropd[small]["peak_extra_gib"], tropd[large]["peak_extra_gib"]
            summary.update(
                growth=(hi - lo - hidden_growth) / lo,
                growth_raw=(hi - lo) / lo,
                growth_from_tokens=small * shape.seq_len,
                growth_to_tokens=large * shape.seq_len,
                growth_hidden_gib=hidden_growth,
            )
    return summary


def write_json(path: Path, rows: list[dict[str, Any]], summary: dict[str, Any], meta: dict[str, Any]) -> None:
    """Read-modify-write: other benchmarks own other keys of the same file."""
    keys = {
        "loss_peak_mem_ratio_vs_naive": summary.get("ratio_vs_naive"),
        "loss_peak_mem_ratio_vs_trl": summary.get("ratio_vs_trl"),
        "loss_peak_growth_2x_to_16x": summary.get("growth"),
        "loss_memory": {**meta, "summary": summary, "measurements": rows},
    }
    update_results(path, keys, machine=meta["machine"], versions=meta["versions"])


def _fmt(value: float | None, spec: str = ".2f") -> str:
    return "—" if value is None else format(value, spec)


def _verdicts(rows: list[dict[str, Any]], summary: dict[str, Any], shape: Shape, largest_run: int) -> list[str]:
    out = []
    if "all_fit_ratio_vs_naive" in summary:
        n = summary["all_paths_fit_tokens"]
        r_naive, r_trl = summary["all_fit_ratio_vs_naive"], summary["all_fit_ratio_vs_trl"]
        where = f"at {n} tokens, the largest size where all three paths fit" + (
            "" if n >= largest_run else f" (tropd alone ran up to {largest_run})"
        )
        out.append(
            f"- **tropd <= 1/8 of naive**: {'met' if r_naive <= 1 / 8 else 'not met'} {where}: tropd's peak extra "
            f"is {r_naive:.3f}x naive's (1/8 = 0.125)."
        )
        naive_extra = _ok(rows, "naive")[n // shape.seq_len]["peak_extra_gib"]
        grads = grads_gib(shape, n // shape.seq_len)
        if grads > naive_extra / 8:
            out.append(
                f"  There the gradients every path must hold (lm_head [V, H] + hidden states [N, H], {grads:.2f} GiB) "
                f"are already {grads / naive_extra:.0%} of naive's {naive_extra:.2f} GiB, so no path that produces "
                "an fp32 lm_head gradient can be under 1/8 at that size."
            )
        out.append(
            f"- **tropd below TRL**: {'met' if r_trl < 1 else 'not met'} {where}: tropd's peak extra is "
            f"{r_trl:.3f}x TRL's."
        )
        if summary.get("ratio_vs_naive_tokens", n) > n:
            out.append(
                f"- At {summary['ratio_vs_naive_tokens']} tokens, the largest size where tropd and naive both "
                f"ran, the ratio is {summary['ratio_vs_naive']:.3f} "
                f"({'met' if summary['ratio_vs_naive'] <= 1 / 8 else 'not met'} against 1/8)."
            )
        for other in ("naive", "trl"):
            if f"ratio_vs_{other}_excl_grads" in summary:
                out.append(
                    f"- Without the gradients every path must hold (the lm_head's [V, H] and the hidden states' "
                    f"[N, H]), tropd's working memory at {summary[f'ratio_vs_{other}_tokens']} tokens is "
                    f"{summary[f'ratio_vs_{other}_excl_grads']:.3f}x {other}'s."
                )
    else:
        out.append("- tropd vs naive / TRL: no size at which all three paths ran.")
    if "growth" in summary:
        g = summary["growth"]
        out.append(
            f"- **growth <= 10%**: {'met' if g <= 0.10 else 'not met'}: from {summary['growth_from_tokens']} to "
            f"{summary['growth_to_tokens']} tokens tropd's peak extra grows by {100 * summary['growth_raw']:.1f}% "
            f"in all, {100 * g:.1f}% beyond the student hidden-state gradient "
            f"(+{summary['growth_hidden_gib']:.2f} GiB)."
        )
    return out


def markdown_section(rows: list[dict[str, Any]], summary: dict[str, Any], meta: dict[str, Any]) -> str:
    shape, machine, versions = meta["shape"], meta["machine"], meta["versions"]
    lines = [
        MD_START,
        "## Loss-path peak memory and time",
        "",
        f"V = {shape['vocab']:,}, H = {shape['hidden']}, k = {shape['top_k']}, fp32 on CPU, sequences of "
        f"{shape['seq_len']} tokens. Student hidden states and lm_head require grad; the teacher's do not. "
        f"Machine: {machine['cpu']}, {machine['cores']} cores, {machine['ram_gib']} GiB RAM; Python "
        f"{versions['python']}, torch {versions['torch']}, transformers {versions['transformers']}, "
        f"TRL loss: {meta['trl_source']}. torch threads per child: {meta.get('threads') or 'torch default (all cores)'}.",
        "",
        "```",
        *meta["commands"],
        "```",
        "",
        *(
            [
                "**Warning:** these rows were measured with different versions of `scoring.py`/`losses.py` "
                f"(fingerprints {', '.join(meta['tropd_cli_shas'])}, column `tropd_cli_sha` in results.json).",
                "",
            ]
            if len(meta.get("tropd_cli_shas", [])) > 1
            else []
        ),
        "- **Paths.** `tropd`: `teacher_scores` (top-k) + `student_scores` with the teacher's top-k ids "
        "(chunked; the backward recomputes each chunk's logits) + `tropd_loss(outlier='fkl')` with a Bernoulli "
        "trust mask + `masked_mean`. `naive`: the same loss from full `[N, V]` logits and `log_softmax` (teacher "
        "and student; each logits tensor is dropped as soon as its log-softmax exists, no entropy: leaner than "
        "`scoring.naive_scores`, so the comparison favours it). `trl`: "
        "`GKDTrainer.generalized_jsd_loss(student_logits, teacher_logits, labels, beta=0.5)` on full logits, as "
        "`GKDTrainer.compute_loss` calls it.",
        "- **Peak extra memory** = peak resident set size during forward + backward minus the resident set size "
        "after the inputs exist (both hidden states and both lm_heads, ids, noise). Each (path, size) runs in a "
        "fresh child process that first runs the path once on tiny tensors (so lazily loaded kernels are in the "
        "baseline), reads `VmRSS`, resets the kernel's high-water mark by writing `5` to `/proc/self/clear_refs`, "
        "runs, and reads `VmHWM`: the kernel's exact maximum, with nothing sampled and nothing missed. (Where "
        "clear_refs is not writable a 1 ms RSS sampler thread stands in; `memory_method` in results.json says which was used.) "
        "The extra includes the lm_head gradient (`[V, H]`, "
        f"{shape['vocab'] * shape['hidden'] * FP32 / GIB:.2f} GiB) and the student hidden-state gradient.",
        "- **Time** is forward + backward wall-clock: the median of 3 runs after a warm-up where one run takes "
        f"under {meta['repeat_below_s']:.0f} s, else a single run (`runs` = 1). The machine was shared with other "
        "jobs while these ran, so times are indicative only (compare sizes within one path with care).",
        f"- **Failures.** Each child caps its address space at {meta['cap_gib']:.1f} GiB over its inputs "
        "(`RLIMIT_AS`), so a size that does not fit fails with an allocation error in that child alone; a size "
        "whose estimate is clearly over the cap is skipped and says what it would need. The cap shrinks to the "
        "machine's free memory less 1 GiB when that is lower (the skip notes give the cap in force).",
        "- **Growth** (tropd, default chunk) = (extra(large) - extra(small) - (N_large - N_small) x H x 4 bytes) "
        "/ extra(small), with small = 2 sequences and large = the largest size run (2x2048 and 16x2048 in the full "
        "run): how much the peak grows with tokens beyond the hidden states themselves, whose gradient (the "
        "subtracted term) any path must hold.",
        "",
        "| path | chunk | tokens | peak extra GiB | fwd+bwd s | runs | status |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        extra = r.get("peak_extra_gib")
        status = r["status"] if r["status"] == "ok" else f"{r['status']}: {r.get('note', '')}"
        if extra is None and "peak_extra_gib_before_failure" in r:
            status += f" (peak extra before failing: {r['peak_extra_gib_before_failure']:.2f} GiB)"
        lines.append(
            f"| {r['path']} | {r['chunk_size'] or '—'} | {r['batch']}x{r['seq_len']} = {r['tokens']:,} | "
            f"{_fmt(extra)} | {_fmt(r.get('seconds'), '.1f')} | {r.get('runs', '—')} | {status} |"
        )
    largest = max((r["tokens"] for r in rows if r["path"] == "tropd" and r["status"] == "ok"), default=0)
    agree = [
        r["tokens"]
        for r in rows
        if r["path"] == "tropd" and r["status"] == "ok" and r["batch"] in _ok(rows, "naive")
        if math.isclose(r["loss"], _ok(rows, "naive")[r["batch"]]["loss"], rel_tol=1e-4)
        and math.isclose(r["weight_grad_norm"], _ok(rows, "naive")[r["batch"]]["weight_grad_norm"], rel_tol=1e-4)
    ]
    if agree:
        lines += [
            "",
            f"Check: at {', '.join(str(t) for t in sorted(set(agree)))} tokens tropd's loss and lm_head-gradient "
            "norm equal the naive path's to 1e-4 (`loss`, `weight_grad_norm` in results.json).",
        ]
    lines += ["", "Targets:", "", *_verdicts(rows, summary, Shape(**shape), largest), MD_END]
    return "\n".join(lines)


def write_markdown(path: Path, section: str) -> None:
    """Replace only this benchmark's marked section; other benchmarks write theirs beside it."""
    write_section(path, section, MD_START, MD_END)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", help="sequences of --seq-len tokens (default 1 2 4 8 16)")
    p.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS))
    p.add_argument("--baseline-sizes", type=int, nargs="*", help="sizes for naive/trl (default: all --sizes)")
    p.add_argument("--seq-len", type=int, help=f"tokens per sequence (default {FULL.seq_len})")
    p.add_argument("--chunk-size", type=int, help="tropd's chunk (default: the project's scoring.chunk_size)")
    p.add_argument(
        "--extra-chunks", type=int, nargs="*", default=[1024], help="more tropd chunks, at 2x and the largest size"
    )
    p.add_argument("--cap-gib", type=float, default=20.0, help="memory a child may use beyond its inputs")
    p.add_argument("--repeat-below", type=float, default=120.0, help="median of 3 when one run is under this (s)")
    p.add_argument("--timeout", type=float, default=3600.0, help="per child (s)")
    p.add_argument("--threads", type=int, help="torch threads per child (default: torch's own; --quick: 1)")
    p.add_argument("--quick", action="store_true", help="tiny shapes, seconds; for the test")
    p.add_argument(
        "--merge", action="store_true", help="keep rows of --out-json that this run does not re-measure (same shapes)"
    )
    p.add_argument(
        "--render-only", action="store_true", help="rewrite --out-json/--out-md from --out-json's rows, measure nothing"
    )
    p.add_argument("--out-json", type=Path, default=RESULTS_JSON)
    p.add_argument("--out-md", type=Path, default=BENCHMARKS_MD)
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.sizes = args.sizes or [2, 16]
        args.baseline_sizes = args.baseline_sizes if args.baseline_sizes is not None else [2]
        args.extra_chunks = []
        args.chunk_size = args.chunk_size or 64
        # Tiny ops spend their time in OpenMP hand-offs, which stall when the cores are busy elsewhere.
        args.threads = args.threads or 1
    else:
        from tropd_cli.config import ScoringConfig

        args.sizes = args.sizes or [1, 2, 4, 8, 16]
        args.chunk_size = args.chunk_size or ScoringConfig().chunk_size
    args.sizes = sorted(set(args.sizes))
    if args.baseline_sizes is None:
        args.baseline_sizes = args.sizes
    return args


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.child:
        child_main(args.child)
        return
    if args.render_only:
        old = json.loads(args.out_json.read_text())["loss_memory"]
        args.chunk_size = old["chunk_size"]
        render(old.pop("measurements"), {k: v for k, v in old.items() if k != "summary"}, args)
        return
    base = QUICK if args.quick else FULL
    shape = Shape(base.vocab, base.hidden, base.top_k, args.seq_len or base.seq_len)
    machine, versions = environment(("torch", "transformers", "trl"))
    meta = {
        "commands": [" ".join(["python benchmarks/loss_memory.py", *argv])],
        "shape": asdict(shape),
        "chunk_size": args.chunk_size,
        "cap_gib": args.cap_gib,
        "repeat_below_s": args.repeat_below,
        "threads": args.threads,
        "machine": machine,
        "versions": versions,
    }
    jobs = plan(args, shape, int(args.cap_gib * GIB))
    kept = previous_rows(args.out_json, meta, jobs) if args.merge else []
    rows: list[dict[str, Any]] = []
    for job in jobs:
        # Never ask for more than the machine has free right now: it is shared.
        free = mem_available() - GIB
        if free < job.cap_bytes:
            job = dataclasses.replace(job, cap_bytes=max(free, 0))
        print(f"{job.path:5s} chunk={job.chunk_size:<5d} {job.batch}x{shape.seq_len} ...", end=" ", flush=True)
        row = run_job(job, args.timeout)
        rows.append(row)
        print(row["status"], _fmt(row.get("peak_extra_gib")), "GiB", _fmt(row.get("seconds"), ".1f"), "s", flush=True)
        # Written after every child, so a long run that is interrupted keeps what it measured.
        render(sort_rows(kept + rows, args.chunk_size), meta, args)
    print(json.dumps(summarise(kept + rows, shape, args.chunk_size), indent=2))


def previous_rows(path: Path, meta: dict[str, Any], jobs: list[Job]) -> list[dict[str, Any]]:
    """Rows of an earlier run with the same shapes that this run does not measure again (``--merge``)."""
    if not path.exists():
        return []
    old = json.loads(path.read_text()).get("loss_memory", {})
    if old.get("shape") != meta["shape"]:
        return []
    meta["commands"] = old.get("commands", []) + meta["commands"]
    redone = {(j.path, j.batch, j.chunk_size if j.path == "tropd" else None) for j in jobs}
    return [r for r in old.get("measurements", []) if (r["path"], r["batch"], r["chunk_size"]) not in redone]


def sort_rows(rows: list[dict[str, Any]], chunk_size: int) -> list[dict[str, Any]]:
    """Default chunk first, by size and path; then tropd's other chunk sizes."""

    def key(r: dict[str, Any]) -> tuple[bool, int, int, int]:
        extra = r["chunk_size"] not in (None, chunk_size)
        return extra, r["chunk_size"] if extra else 0, r["tokens"], PATHS.index(r["path"])

    return sorted(rows, key=key)


def render(rows: list[dict[str, Any]], meta: dict[str, Any], args: argparse.Namespace) -> None:
    shape = Shape(**meta["shape"])
    meta["trl_source"] = next((r["trl_source"] for r in rows if r.get("trl_source")), "not run")
    meta["tropd_cli_shas"] = sorted({r["tropd_cli_sha"] for r in rows if r.get("tropd_cli_sha")})
    summary = summarise(rows, shape, args.chunk_size)
    write_json(args.out_json, rows, summary, meta)
    write_markdown(args.out_md, markdown_section(rows, summary, meta))


if __name__ == "__main__":
    main()
