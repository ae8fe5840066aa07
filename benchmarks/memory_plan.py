"""Per-GPU memory and step-time planning for the paper's two runs, and one CPU measurement to check the plan.

Computed (``tropd_cli.planning``, no GPU needed): every component tropd holds per GPU for
R1-Distill-Qwen-1.5B <- Skywork-OR1-Math-7B and Qwen3-1.7B <- Qwen3-4B at the paper's settings
(128 prompts x 4 rollouts, 8192 new tokens, top-k 64, 200 steps): the presets as configured
(``conf/experiment/paper/*.yaml``: one vLLM engine, the student's; the HF teacher writing the guidance
prefixes ``rollout.generation_batch_size`` rows at a time; 16 micro-batches, checkpointing) on 8 H100s and
8 H200s, what fits and the settings recommended for both, the two-engine alternative (a teacher engine for
the prefixes, ``VLLM_ENABLE_V1_MULTIPROCESSING=1``), the HF loop with ``rollout.generation_batch_size``
instead, the fewest ``optim.micro_batches`` with the HF sampler over a whole rank batch, and FLOP /
bandwidth step and run times.

Measured (CPU, a fresh child process): one training step of the default ``tropd train`` config
(teacher SmolLM2-135M-Instruct, 16-layer student), resident memory before and after loading, after the
first step, and the peak of the second step (kernel high-water mark, ``/proc/self/clear_refs`` +
``VmHWM``), next to the plan for the same shapes.

Usage::

    python benchmarks/memory_plan.py               # tables + CPU measurement (a few minutes); writes docs/scaling.md
    python benchmarks/memory_plan.py --no-measure  # tables only (seconds; keeps the measurement in the doc)
    python benchmarks/memory_plan.py --out-md /tmp/s.md --json /tmp/plan.json
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from _report import environment, write_section

ROOT = Path(__file__).resolve().parents[1]
SCALING_MD = ROOT / "docs" / "scaling.md"
MD_START, MD_END = "<!-- memory-plan:start -->", "<!-- memory-plan:end -->"
USABLE = 0.9  # a plan "fits" when its peak is within 90% of the GPU's memory

sys.path.insert(0, str(ROOT / "src"))

from tropd_cli import planning  # noqa: E402
from tropd_cli.planning import GPU, H100, H200, GiB, MemoryPlan, RunShape, plan_memory  # noqa: E402

PRESET_TITLES = {
    "r1-1.5b<-skywork-7b": "DeepSeek-R1-Distill-Qwen-1.5B <- Skywork-OR1-Math-7B",
    "qwen3-1.7b<-qwen3-4b": "Qwen3-SFT-1.7B <- Qwen3-Nemotron-4B (Qwen3-1.7B / Qwen3-4B-Base shapes)",
}
MODEL_ROWS = [
    (
        "DeepSeek-R1-Distill-Qwen-1.5B",
        planning.R1_DISTILL_QWEN_1_5B,
        "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B config.json",
    ),
    ("Skywork-OR1-Math-7B", planning.SKYWORK_OR1_MATH_7B, "base DeepSeek-R1-Distill-Qwen-7B config.json"),
    ("Qwen3-1.7B (student shape)", planning.QWEN3_1_7B, "Qwen/Qwen3-1.7B model card + config"),
    ("Qwen3-4B-Base (teacher shape)", planning.QWEN3_4B, "Qwen/Qwen3-4B-Base model card + config"),
]


def gib(n: float) -> str:
    return f"{n / GiB:.1f}"


# ---------------------------------------------------------------------------------------------
# Computed


def short(gpu: GPU) -> str:
    return gpu.name.split()[0]


# Settings recommended for the presets as they run by default (one vLLM engine, the student's; the HF teacher
# writes the guidance prefixes), one set for 8 H100s and 8 H200s alike (shares are fractions of the GPU, so the
# H100 binds), checked at step 0 (the HF teacher's prefix cache at its largest) and at the last steps (no
# prefixes: the weight sync's cached blocks beside the student engine). tropd empties torch's cache once the HF
# teacher's prefixes are written (EngineSamplers.after_prefixes), so their blocks no longer sit beside the student
# engine: `rollout.generation_batch_size` only sets the prefixes phase, and the engine's share only the sampling
# phase and the startup. The eager HF loop is launch-bound, so the fewer calls the HF teacher writes the prefixes
# in, the shorter the run: the most rows per call that fit within HEADROOM, beside the preset's 0.3 share.
# The presets are configured with these values. R1 <- Skywork: one call of all 64 rows (54.4 GiB per H100 at step 0, the prefixes phase), 83 rollouts at once
# on an H100 (one wave, a pool with room to spare for vLLM's own activations), about 30% faster than two calls
# of 32 rows. Qwen3: two calls of 32 rows (all 64 would need 81 GiB of teacher cache), about 20% faster than
# three calls of 22 rows; 21 rollouts at once on an H100 (four waves): a 0.45 share would hold 33
# (two waves) for about 3% less time in the model, which takes waves as free of overheads: not worth a larger
# engine. optim.micro_batches stays at 16 (the training phase is far from the peak).
RECOMMENDED: dict[str, dict[str, Any]] = {
    "r1-1.5b<-skywork-7b": dict(micro_batches=16, generation_batch_size=64, vllm_gpu_memory_utilization=0.3),
    "qwen3-1.7b<-qwen3-4b": dict(micro_batches=16, generation_batch_size=32, vllm_gpu_memory_utilization=0.3),
}
# The alternative: a teacher engine writes the prefixes (rollout.vllm.teacher_prefixes=true), each engine in a
# process of its own (VLLM_ENABLE_V1_MULTIPROCESSING=1: vLLM's sleep mode allows one engine per process; the
# weight sync then goes through collective_rpc and host RAM). The engines are awake one at a time, so each share
# only has to fit beside the rest of the phases its engine is awake in and beside the models at startup. Each
# engine gets the share that holds as many of the rank's 64 rollouts as it can with every phase and the startup
# within HEADROOM of an H100 (the student engine no more than it needs to hold all 64).
TWO_ENGINES: dict[str, dict[str, Any]] = {
    "r1-1.5b<-skywork-7b": dict(
        micro_batches=16,
        vllm_teacher_prefixes=True,
        vllm_multiprocessing=True,
        vllm_gpu_memory_utilization=0.3,
        vllm_teacher_gpu_memory_utilization=0.55,
    ),
    "qwen3-1.7b<-qwen3-4b": dict(
        micro_batches=16,
        vllm_teacher_prefixes=True,
        vllm_multiprocessing=True,
        vllm_gpu_memory_utilization=0.6,
        vllm_teacher_gpu_memory_utilization=0.65,
    ),
}
TWO_ENGINE_ENV = "VLLM_ENABLE_V1_MULTIPROCESSING=1 VLLM_ALLOW_INSECURE_SERIALIZATION=1"
HEADROOM = 0.85  # recommended settings keep every phase and the startup within 85% of an H100 (the fit line: 90%)
STEPS = 200  # the presets' `steps`


def step0(run: RunShape) -> RunShape:
    """Guidance at step 0: the prefix cap is the whole response budget (cosine schedule)."""
    return replace(run, prefix_tokens=run.response_tokens)


def late(run: RunShape) -> RunShape:
    """The last steps: the prefix cap is 0, no prefixes are written."""
    return replace(run, prefix_tokens=0)


def fit_row(run: RunShape, gpu: GPU) -> dict[str, Any]:
    m = planning.smallest_micro_batches(run, gpu, USABLE)
    best = plan_memory(replace(run, micro_batches=m or run.sequences_per_rank), gpu)
    return {
        "micro_batches": m,
        "micro_batch_sequences": replace(run, micro_batches=m).micro_batch_sequences if m else None,
        "peak_gib": best.peak / GiB,
        "phase": best.peak_phase,
        "sampling_gib": (best.persistent + best.phase_total("sampling")) / GiB,
        "fits": m is not None,
    }


def within_headroom(run: RunShape, gpu: GPU) -> bool:
    """Fits, with every phase of every step and the startup within HEADROOM of the GPU: step 0 (the HF teacher's
    prefixes at their largest) and the last steps (no prefixes: nothing empties torch's cache between the weight
    sync and the student engine's wake) bound every step in between."""
    plans = [plan_memory(step0(run), gpu), plan_memory(late(run), gpu)]
    return all(max(p.peak, p.startup) <= HEADROOM * gpu.memory_bytes and not p.problems(gpu, USABLE) for p in plans)


def vllm_case(label: str, run: RunShape, gpu: GPU) -> dict[str, Any]:
    """A vLLM setup at step 0 (the HF teacher's prefix cache at its largest; the engines' shares do not depend on
    the cap) and at the last steps (no prefixes: the weight sync's cached blocks beside the student engine), which
    bound every step; an engine's room is the smaller of the two."""
    first = step0(run)
    plan = plan_memory(first, gpu)
    last = plan_memory(late(run), gpu)
    roles = ("student", "teacher") if run.teacher_engine else ("student",)
    rooms: list[float | None] = []
    for role in roles:
        pair = [planning.vllm_engine_room(r, gpu, USABLE, role) for r in (first, late(run))]
        rooms.append(min(r for r in pair if r is not None) if None not in pair else None)
    return {
        "label": label,
        "gpu": short(gpu),
        "micro_batches": run.micro_batches,
        "generation_batch_size": None if run.teacher_engine else run.generation_batch_size,
        "teacher_calls": None if run.teacher_engine else run.generation_chunks,
        "shares": [run.vllm_gpu_memory_utilization]
        + ([run.vllm_teacher_gpu_memory_utilization] if run.teacher_engine else []),
        "room": rooms,
        "peak_gib": plan.peak / GiB,
        "peak_share": plan.peak / gpu.memory_bytes,
        "startup_share": plan.startup / gpu.memory_bytes,
        "phase": plan.peak_phase,
        "startup_gib": plan.startup / GiB,
        "late_peak_gib": last.peak / GiB,
        "late_phase": last.peak_phase,
        "host_gib": plan.host / GiB,
        "problems": list(dict.fromkeys(plan.problems(gpu, USABLE) + last.problems(gpu, USABLE))),
        "rows_at_once": [planning.vllm_concurrent_rows(run, gpu, role) for role in roles],
        "late_s": planning.estimate_step(run, gpu).total_s,
        "step0_s": planning.estimate_step(step0(run), gpu).total_s,
        "run_h": planning.estimate_run_seconds(run, gpu, STEPS) / 3600,
    }


def loop_case(run: RunShape, gpu: GPU) -> dict[str, Any]:
    """rollout.backend=loop instead of vllm: the largest generation_batch_size that fits, and the smallest one
    with as few chunks (same time, less memory)."""
    rows = run.sequences_per_rank
    late = planning.largest_generation_batch_size(run, gpu, USABLE)
    first = planning.largest_generation_batch_size(step0(run), gpu, USABLE)
    out: dict[str, Any] = {"gpu": short(gpu), "largest_late": late, "largest_step0": first, "recommended": None}
    if first is None:
        return out
    chunks = -(-rows // first)
    size = -(-rows // chunks)
    chosen = replace(run, generation_batch_size=0 if size >= rows else size)
    plan = plan_memory(step0(chosen), gpu)
    out.update(
        recommended=chosen.generation_batch_size,
        chunks=chosen.generation_chunks,
        peak_gib=plan.peak / GiB,
        phase=plan.peak_phase,
        late_s=planning.estimate_step(chosen, gpu).total_s,
        step0_s=planning.estimate_step(step0(chosen), gpu).total_s,
        run_h=planning.estimate_run_seconds(chosen, gpu, STEPS) / 3600,
        run=chosen,
    )
    return out


def single_gpu(preset: str, gpu: GPU) -> dict[str, Any]:
    """One GPU, the paper's 512 rollouts, HF loop: the largest generation_batch_size (checkpointing, one
    sequence per micro-batch) and the run's time."""
    run = planning.paper_run(
        preset, prompt_tokens=1024, chunk_size=1024, gradient_checkpointing=True, micro_batches=512
    )
    first = planning.largest_generation_batch_size(step0(run), gpu, USABLE)
    out: dict[str, Any] = {"gpu": short(gpu), "largest_step0": first}
    if first:
        chunks = -(-run.sequences // first)
        chosen = replace(run, generation_batch_size=-(-run.sequences // chunks))
        out.update(
            recommended=chosen.generation_batch_size,
            chunks=chunks,
            run_h=planning.estimate_run_seconds(chosen, gpu, STEPS) / 3600,
        )
    return out


def setups(preset: str) -> list[tuple[str, RunShape]]:
    """(label, run) of the vLLM setups compared: as configured, recommended (when it differs), two engines."""
    configured = planning.preset_run(preset)
    recommended = replace(configured, **RECOMMENDED[preset])
    two = replace(configured, **TWO_ENGINES[preset])
    if recommended == configured:
        return [("as configured = recommended", configured), ("two engines (alternative)", two)]
    return [("as configured", configured), ("recommended", recommended), ("two engines (alternative)", two)]


def compute(micro_batches: dict[str, int]) -> dict[str, Any]:
    out: dict[str, Any] = {"presets": {}}
    for preset in planning.PRESETS:
        configured = planning.preset_run(preset)
        plans = {short(gpu): plan_memory(step0(configured), gpu) for gpu in (H100, H200)}
        late = {short(gpu): plan_memory(configured, gpu) for gpu in (H100, H200)}
        cases, loops, steps = [], [], {}
        for name, values in (("RECOMMENDED", RECOMMENDED[preset]), ("TWO_ENGINES", TWO_ENGINES[preset])):
            for gpu in (H100, H200):
                if not within_headroom(replace(configured, **values), gpu):
                    raise SystemExit(f"{name}[{preset!r}] no longer fits {gpu.name} within {HEADROOM:.0%}: update it")
        for gpu in (H100, H200):
            cases += [vllm_case(label, run, gpu) for label, run in setups(preset)]
            loop = loop_case(replace(configured, backend="loop"), gpu)
            loops.append(loop)
            runs = [(f"vLLM {label}", run) for label, run in setups(preset)]
            if loop.get("run") is not None:
                n = loop["run"].generation_batch_size
                runs.append((f"loop, generation_batch_size={n}", loop.pop("run")))
            for label, run in runs:
                steps[(gpu.name, label)] = {
                    "late steps": planning.estimate_step(run, gpu),
                    "step 0": planning.estimate_step(step0(run), gpu),
                    "run_s": planning.estimate_run_seconds(run, gpu, STEPS),
                }
        # The HF sampler over the whole rank batch (no generation_batch_size): the earlier planning view.
        ref = planning.paper_run(preset, world_size=8, gradient_checkpointing=True, micro_batches=micro_batches[preset])
        fits = []
        for n in (8,):  # one GPU never holds the whole batch's cache: see single_gpu
            for ckpt in (False, True):
                for prefix in (False, True):
                    run = planning.paper_run(preset, world_size=n, gradient_checkpointing=ckpt)
                    run = step0(run) if prefix else run
                    for gpu in (H100, H200):
                        fits.append({"gpus": n, "ckpt": ckpt, "prefix": prefix, "gpu": gpu.name, **fit_row(run, gpu)})
        out["presets"][preset] = {
            "configured": configured,
            "plans": plans,
            "late": late,
            "no_ckpt": plan_memory(replace(configured, gradient_checkpointing=False), H100),
            "cases": cases,
            "loops": loops,
            "steps": steps,
            "ref": ref,
            "fits": fits,
            "single": [single_gpu(preset, gpu) for gpu in (H100, H200)],
        }
    return out


# ---------------------------------------------------------------------------------------------
# Measured: one CPU training step of the default `tropd train` config


def child_main() -> None:
    import torch
    from hydra import compose, initialize_config_dir
    from loss_memory import PeakMeter, rss_bytes
    from omegaconf import OmegaConf

    from tropd_cli.commands.common import register_configs
    from tropd_cli.data import examples_from_config
    from tropd_cli.models import default_cache_dir, load_pair
    from tropd_cli.train import step as step_module
    from tropd_cli.train.setup import build_run
    from tropd_cli.validate import validate_train

    torch.set_num_threads(2)
    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = OmegaConf.to_object(compose("train", ["logger=none", "device=cpu"]))
    validate_train(cfg)
    torch.manual_seed(cfg.seed)
    device = torch.device("cpu")
    examples = examples_from_config(cfg.dataset)
    gc.collect()
    rss0 = rss_bytes()
    teacher, student = load_pair(cfg.teacher, cfg.student, device=device, cache_dir=default_cache_dir(cfg.cache_dir))
    trainer = build_run(cfg, teacher=teacher, student=student, examples=examples)
    gc.collect()
    rss1 = rss_bytes()
    shapes: list[dict[str, int]] = []
    make_batch = step_module.make_batch

    def recording(run: Any, step: int):
        batch = make_batch(run, step)
        shapes.append(
            {
                "rows": int(batch.input_ids.shape[0]),
                "prompt": int(batch.prompt_len),
                "response": int(batch.response_mask.shape[1]),
                "prefix": int(batch.prefix_mask.sum(-1).max()),
            }
        )
        return batch

    step_module.make_batch = recording  # type: ignore[assignment]
    caches: dict[str, dict[int, Any]] = {"student": {}, "teacher": {}}

    def capture(role: str):
        def hook(module, args, kwargs):
            cache = kwargs.get("past_key_values")
            if cache is not None:
                caches[role][id(cache)] = cache

        return hook

    handles = [
        trainer.samplers.student.register_forward_pre_hook(capture("student"), with_kwargs=True),
        teacher.model.register_forward_pre_hook(capture("teacher"), with_kwargs=True),
    ]
    t0 = time.perf_counter()
    step_module.train_step(trainer, 0)
    gc.collect()
    rss2 = rss_bytes()
    for seen in caches.values():
        seen.clear()
    meter = PeakMeter()
    meter.reset()
    step_module.train_step(trainer, 1)
    peak = meter.peak()
    meter.close()
    seconds = (time.perf_counter() - t0) / 2
    for h in handles:
        h.remove()

    def largest(seen: dict[int, Any]) -> dict[str, int]:
        sizes = [
            (sum(t.numel() * t.element_size() for layer in c.layers for t in (layer.keys, layer.values)), c)
            for c in seen.values()
        ]
        if not sizes:
            return {"bytes": 0, "positions": 0}
        nbytes, cache = max(sizes, key=lambda x: x[0])
        return {"bytes": nbytes, "positions": int(cache.layers[0].keys.shape[-2])}

    result = {
        "teacher": cfg.teacher.name,
        "student_layers": student.model.config.num_hidden_layers,
        "teacher_config": shape_keys(teacher.model.config.to_dict()),
        "student_config": shape_keys(student.model.config.to_dict()),
        "sampler_dtype": str(next(trainer.samplers.student.parameters()).dtype).removeprefix("torch."),
        "teacher_dtype": str(next(teacher.model.parameters()).dtype).removeprefix("torch."),
        "student_dtype": str(next(student.model.parameters()).dtype).removeprefix("torch."),
        "precision": "bf16" if getattr(trainer, "bf16", False) else "fp32",
        "cfg": {
            "batch_size": cfg.rollout.batch_size,
            "n_samples": cfg.rollout.n_samples_per_prompt,
            "max_new_tokens": cfg.rollout.max_new_tokens,
            "chunk_size": cfg.scoring.chunk_size,
            "top_k": cfg.method.top_k,
            "micro_batches": cfg.optim.micro_batches,
            "gradient_checkpointing": cfg.student.gradient_checkpointing,
            "method": cfg.method.name,
            "guidance": cfg.guidance.enabled,
        },
        "shape_step1": shapes[-1],
        "kv_cache_step1": {role: largest(seen) for role, seen in caches.items()},
        "seconds_per_step": seconds,
        "rss_before_models": rss0,
        "rss_after_setup": rss1,
        "rss_after_step0": rss2,
        "peak_step1": peak,
        "memory_method": meter.method,
        "threads": torch.get_num_threads(),
    }
    print("RESULT " + json.dumps(result), flush=True)


SHAPE_KEYS = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "intermediate_size",
    "tie_word_embeddings",
    "attention_bias",
    "mlp_bias",
)


def shape_keys(config: dict[str, Any]) -> dict[str, Any]:
    """The config.json fields planning reads."""
    return {k: config[k] for k in SHAPE_KEYS if k in config}


MEASURED_TAG = "<!-- memory-plan:measured "


def previous_measurement(path: Path) -> dict[str, Any] | None:
    """The measurement embedded in an earlier run's section (so that --no-measure keeps it)."""
    if not path.exists():
        return None
    for line in path.read_text().splitlines():
        if line.startswith(MEASURED_TAG) and line.endswith(" -->"):
            return json.loads(line[len(MEASURED_TAG) : -len(" -->")])
    return None


def measure(timeout_s: float = 900) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, __file__, "--child"],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        cwd=ROOT,
    )
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    raise RuntimeError(f"measurement child failed ({proc.returncode}):\n{proc.stderr[-3000:]}")


def planned_for_measurement(m: dict[str, Any]) -> MemoryPlan:
    s = planning.ModelShape.from_config(m["student_config"])
    t = planning.ModelShape.from_config(m["teacher_config"])
    shape = m["shape_step1"]
    run = RunShape(
        student=s,
        teacher=t,
        world_size=1,
        sequences=shape["rows"],
        prompt_tokens=shape["prompt"],
        response_tokens=shape["response"],
        prefix_tokens=shape["prefix"],
        micro_batches=m["cfg"]["micro_batches"],
        chunk_size=m["cfg"]["chunk_size"],
        top_k=m["cfg"]["top_k"],
        gradient_checkpointing=m["cfg"]["gradient_checkpointing"],
        precision=m["precision"],
        sampler_dtype=m["sampler_dtype"],
        teacher_dtype=m["teacher_dtype"],
    )
    return plan_memory(run)


# ---------------------------------------------------------------------------------------------
# Markdown


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f}"


def models_table() -> list[str]:
    lines = [
        "| model | arch | layers | hidden | heads / KV heads x head_dim | MLP | vocab | tied | parameters | of which layers | KV cache per token (bf16) | source |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, cfg, source in MODEL_ROWS:
        s = planning.ModelShape.from_config(cfg)
        c = planning.param_counts(cfg)
        kv = planning.kv_cache_bytes(s, 1, 1)
        lines.append(
            f"| {name} | {cfg['model_type']} | {s.layers} | {s.hidden} | {s.heads} / {s.kv_heads} x {s.head_dim} | "
            f"{s.intermediate} | {s.vocab:,} | {'yes' if s.tied else 'no'} | {c.total / 1e9:.3f}B | {c.body / 1e9:.3f}B | "
            f"{kv / 1024:.0f} KiB | {source} |"
        )
    return lines


PHASE_LABEL = {
    "persistent": "always",
    "prefixes": "prefixes",
    "sampling": "sampling",
    "teacher_scoring": "teacher scoring",
    "training": "training",
    "optimizer": "optimizer step",
    "startup": "startup",
    "host": "host RAM",
}
ORDER = ("persistent", "prefixes", "sampling", "teacher_scoring", "training", "optimizer", "startup", "host")


def component_table(data: dict[str, Any]) -> list[str]:
    run: RunShape = data["configured"]
    h100: MemoryPlan = data["plans"]["H100"]
    h200: MemoryPlan = data["plans"]["H200"]
    b = run.micro_batch_sequences
    h100_late: MemoryPlan = data["late"]["H100"]
    h200_late: MemoryPlan = data["late"]["H200"]
    g = run.generation_batch_size
    lines = [
        f"8 GPUs, {run.sequences_per_rank} rollouts per GPU, `optim.micro_batches={run.micro_batches}` ({b} sequences "
        f"of up to {run.seq_len} tokens per micro-batch: prompts planned at `dataset.max_prompt_tokens={run.prompt_tokens}`), "
        f"`student.gradient_checkpointing=true`, `scoring.chunk_size={run.chunk_size}`, bf16 compute (FSDP2 mixed "
        "precision), teacher replicated in bf16 and scored by HF, `rollout.backend=vllm` with the `rollout.vllm` defaults: "
        f"one engine, the student's, `gpu_memory_utilization={run.vllm_gpu_memory_utilization}`, sleep mode; the HF "
        f"teacher writes the guidance prefixes with the loop sampler, `rollout.generation_batch_size={g}` rows at a "
        f"time ({run.generation_chunks} calls per rollout). At step 0, where the prefix cap is the whole "
        f"{run.response_tokens}-token budget and the teacher's cache is largest: *prefixes*: the HF teacher writes them "
        "beside the student engine's weights (woken by the weight sync); *sampling*: tropd empties torch's cache once "
        "they are written (`EngineSamplers.after_prefixes`), and the student engine wakes whole beside nothing of torch's "
        "to continue them. The teacher's cache shrinks with the cap; at the last steps (cap 0: no prefixes, so "
        "nothing empties torch's cache after the weight sync) the sampling phase is the engine beside the sync's "
        "cached blocks (last rows of the phase table).",
        "",
        "| component | phase | H100 GiB | H200 GiB | what |",
        "|---|---|---|---|---|",
    ]
    for phase in ORDER:
        for c, d in zip(h100.components, h200.components, strict=True):
            if c.phase != phase:
                continue
            lines.append(
                f"| {c.name.replace('_', ' ')} | {PHASE_LABEL[c.phase]} | {gib(c.bytes)} | {gib(d.bytes)} | {c.note} |"
            )
            if c.name == "activations":
                alt = gib(data["no_ckpt"].get("activations"))
                lines.append(
                    f"| activations without checkpointing | (training) | {alt} | {alt} | same micro-batch, not counted |"
                )
    lines += ["", "| phase | H100 GiB | H200 GiB |", "|---|---|---|"]
    for p in planning.PHASES:
        lines.append(
            f"| always + {PHASE_LABEL[p]} | {gib(h100.persistent + h100.phase_total(p))} | "
            f"{gib(h200.persistent + h200.phase_total(p))} |"
        )
    lines.append(
        f"| **peak at step 0** (fits: {USABLE:.0%} of {gib(H100.memory_bytes)} / {gib(H200.memory_bytes)}) | "
        f"**{gib(h100.peak)}** ({PHASE_LABEL[h100.peak_phase]}) | **{gib(h200.peak)}** ({PHASE_LABEL[h200.peak_phase]}) |"
    )
    lines.append(
        f"| **peak at the last steps** (cap 0: no prefixes; the weight sync's cached blocks beside the engine) | "
        f"**{gib(h100_late.peak)}** ({PHASE_LABEL[h100_late.peak_phase]}) | "
        f"**{gib(h200_late.peak)}** ({PHASE_LABEL[h200_late.peak_phase]}) |"
    )
    lines.append(
        f"| startup (models before sharding + the engine's share) | {gib(h100.startup)} | {gib(h200.startup)} |"
    )
    lines.append(
        f"| host RAM per rank (per node of 8) | {gib(h100.host)} ({gib(8 * h100.host)}) | "
        f"{gib(h200.host)} ({gib(8 * h200.host)}) |"
    )
    return lines


def _slash(values: list[Any], fmt: str) -> str:
    """Student / teacher engine figures; the teacher's is "HF" when the HF teacher writes the prefixes."""
    parts = ["—" if v is None else format(v, fmt) for v in values]
    return " / ".join(parts + ["HF"] * (2 - len(parts)))


def cases_table(data: dict[str, Any]) -> list[str]:
    lines = [
        "| GPU | setup | `optim.micro_batches` | `rollout.generation_batch_size` (HF teacher calls) | "
        "engine shares: student / teacher | room: student / teacher | step-0 peak GiB (phase, of the GPU) | "
        "last-steps peak GiB (phase) | startup GiB | host RAM GiB per rank | fits | rollouts held at once: "
        f"student / teacher engine (of 64) | late step s | step 0 s | {STEPS} steps h |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in data["cases"]:
        fits = "yes" if not c["problems"] else "**no**: " + "; ".join(c["problems"])
        g = c["generation_batch_size"]
        calls = "— (teacher engine)" if g is None else f"{g} ({c['teacher_calls']})"
        lines.append(
            f"| {c['gpu']} | {c['label']} | {c['micro_batches']} | {calls} | {_slash(c['shares'], 'g')} | "
            f"{_slash(c['room'], '.2f')} | {c['peak_gib']:.1f} ({PHASE_LABEL[c['phase']]}, {c['peak_share']:.0%}) | "
            f"{c['late_peak_gib']:.1f} ({PHASE_LABEL[c['late_phase']]}) | {c['startup_gib']:.1f} ({c['startup_share']:.0%}) | {c['host_gib']:.1f} | {fits} | "
            f"{_slash(c['rows_at_once'], 'd')} | "
            f"{c['late_s']:.0f} | {c['step0_s']:.0f} | {c['run_h']:.1f} |"
        )
    return lines


def loop_table(data: dict[str, Any]) -> list[str]:
    lines = [
        "| GPU | largest `generation_batch_size`: late steps / step 0 | recommended | sampling calls per rollout | "
        f"step-0 peak GiB (phase) | late step s | step 0 s | {STEPS} steps h |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in data["loops"]:
        if r["recommended"] is None:
            lines.append(f"| {r['gpu']} | {r['largest_late']} / none | does not fit | — | — | — | — | — |")
            continue
        rec = "0 (all 64 at once)" if r["recommended"] == 0 else str(r["recommended"])
        lines.append(
            f"| {r['gpu']} | {r['largest_late']} / {r['largest_step0']} | {rec} | {r['chunks']} | "
            f"{r['peak_gib']:.1f} ({PHASE_LABEL[r['phase']]}) | {r['late_s']:.0f} | {r['step0_s']:.0f} | {r['run_h']:.1f} |"
        )
    return lines


def fit_table(data: dict[str, Any]) -> list[str]:
    lines = [
        "| GPUs | GPU | checkpointing | sampling | fewest `optim.micro_batches` | sequences per micro-batch | peak GiB | peak phase |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in data["fits"]:
        samp = "step 0 (prefix 8192)" if r["prefix"] else "late steps"
        if r["fits"]:
            mb, seqs = str(r["micro_batches"]), str(r["micro_batch_sequences"])
            peak = f"{r['peak_gib']:.1f}"
        else:
            mb, seqs = "does not fit", "—"
            peak = f"{r['peak_gib']:.1f} (sampling alone: {r['sampling_gib']:.1f})"
        phase = PHASE_LABEL[r["phase"]]
        lines.append(
            f"| {r['gpus']} | {r['gpu'].split()[0]} | {'on' if r['ckpt'] else 'off'} | {samp} | {mb} | {seqs} | {peak} | {phase} |"
        )
    return lines


def step_table(data: dict[str, Any]) -> list[str]:
    ref: RunShape = data["configured"]
    lines = [
        "| GPU | rollouts | step | teacher PFLOP | student PFLOP | teacher s | student s | decode bound s | decode s | "
        f"step s | new tokens/s (all GPUs) | {STEPS} steps h |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    tokens = ref.sequences * ref.response_tokens
    for (gpu, label), entry in data["steps"].items():
        for when in ("late steps", "step 0"):
            est = entry[when]
            hours = f"{entry['run_s'] / 3600:.1f}" if when == "late steps" else ""
            lines.append(
                f"| {gpu.split()[0]} | {label} | {when} | {est.teacher_flops / 1e15:.1f} | {est.student_flops / 1e15:.1f} | "
                f"{est.teacher_s:.0f} | {est.student_s:.0f} | {est.decode_bound_s:.0f} | {est.decode_s:.0f} | "
                f"{est.total_s:.0f} | {tokens / est.total_s:,.0f} | {hours} |"
            )
    return lines


def measured_section(m: dict[str, Any]) -> list[str]:
    plan = planned_for_measurement(m)
    shape = m["shape_step1"]
    setup = m["rss_after_setup"] - m["rss_before_models"]
    optim = m["rss_after_step0"] - m["rss_after_setup"]
    transient = m["peak_step1"] - m["rss_after_step0"]
    p_setup = plan.get("student_weights") + plan.get("sampler_copy") + plan.get("teacher_weights")
    p_optim = plan.get("student_grads") + plan.get("optimizer_states")
    p_transient = plan.phase_total(plan.peak_phase)
    kv = m["kv_cache_step1"]
    sampler_bytes = planning.DTYPE_BYTES[m["sampler_dtype"]]
    teacher_bytes = planning.DTYPE_BYTES[m["teacher_dtype"]]
    # The plan's bounds: the teacher writes at most the prefix cap, the student runs prompt + longest prefix
    # + a whole response; the measured rows show the positions the caches really reached.
    s_bound = shape["prompt"] + shape["prefix"] + shape["response"] - 1
    t_bound = shape["prompt"] + shape["prefix"] - 1
    c = m["cfg"]
    rows = [
        ("models loaded (student fp32, sampling copy, teacher)", setup, p_setup),
        ("first step (gradients + AdamW states appear)", optim, p_optim),
        (
            f"peak of the second step above the first's end (plan: {PHASE_LABEL[plan.peak_phase]} phase)",
            transient,
            p_transient,
        ),
        (
            f"teacher's KV cache (guidance prefixes): {kv['teacher']['positions']} positions, plan {t_bound}",
            kv["teacher"]["bytes"],
            planning.kv_cache_bytes(plan.run.teacher, shape["rows"], t_bound, teacher_bytes),
        ),
        (
            f"student's KV cache: {kv['student']['positions']} positions, plan (bound) {s_bound}",
            kv["student"]["bytes"],
            planning.kv_cache_bytes(plan.run.student, shape["rows"], s_bound, sampler_bytes),
        ),
    ]
    lines = [
        "Measured before per-row guidance budgets and `rollout.generation_batch_size` existed; at "
        "`generation_batch_size=0` the plan's cache bounds are the same formulas (a sampling call's rows, left-"
        "padded to its longest context, decoding to its longest budget).",
        "",
        f"`tropd train` defaults on this CPU: teacher `{m['teacher']}` ({m['teacher_dtype']}), student = its "
        f"{m['student_layers']}-layer copy ({m['student_dtype']}, compute {m['precision']}), sampling copy "
        f"{m['sampler_dtype']}; method `{c['method']}`, guidance {'on' if c['guidance'] else 'off'}, "
        f"{c['batch_size']} x {c['n_samples']} rollouts of up to {c['max_new_tokens']} tokens. Step 2's batch: "
        f"prompt width {shape['prompt']}, response width {shape['response']}, longest guidance prefix {shape['prefix']}. "
        f"Resident memory from `/proc/self/status` ({m['memory_method']}; peak = `VmHWM` after writing 5 to "
        f"`/proc/self/clear_refs`), {m['threads']} threads, a fresh process.",
        "",
        "| what | measured MiB | planned MiB | measured / planned |",
        "|---|---|---|---|",
    ]
    for label, got, want in rows:
        ratio = f"{got / want:.2f}" if want else "—"
        lines.append(f"| {label} | {_mib(got)} | {_mib(want)} | {ratio} |")
    return lines


CONFIG_KEYS = {
    "micro_batches": "optim.micro_batches",
    "generation_batch_size": "rollout.generation_batch_size",
    "vllm_teacher_prefixes": "rollout.vllm.teacher_prefixes",
    "vllm_gpu_memory_utilization": "rollout.vllm.gpu_memory_utilization",
    "vllm_teacher_gpu_memory_utilization": "rollout.vllm.teacher_gpu_memory_utilization",
}


def overrides(values: dict[str, Any]) -> str:
    """The Hydra overrides of a RunShape change (vllm_multiprocessing is an environment variable, not a key)."""
    return " ".join(
        f"{CONFIG_KEYS[k]}={str(v).lower() if isinstance(v, bool) else v}"
        for k, v in values.items()
        if k != "vllm_multiprocessing"
    )


def markdown(computed: dict[str, Any], measured: dict[str, Any] | None, env: dict[str, Any]) -> str:
    out = [MD_START, "## Planning figures (generated)", ""]
    out.append(
        "Regenerate with `python benchmarks/memory_plan.py` (tables only: `--no-measure`, a few seconds). "
        "All figures per GPU, GiB = 2^30 bytes. A plan *fits* when its peak and its startup are within "
        f"{USABLE:.0%} of the GPU's memory (H100: {H100.memory_bytes / GiB:.1f} GiB, H200: "
        f"{H200.memory_bytes / GiB:.1f} GiB; the rest is for the CUDA context, NCCL and allocator fragmentation) "
        "and every vLLM engine's KV pool holds one `max_model_len` sequence (and two sleeping engines have a process "
        "each). Paper settings throughout: "
        "128 prompts x 4 rollouts = 512 sequences per step, up to 8192 new tokens, top-k 64, 200 steps."
    )
    out += ["", "### Models", ""] + models_table()
    for preset, data in computed["presets"].items():
        out += [
            "",
            f"### {PRESET_TITLES[preset]}",
            "",
            "#### As configured (`experiment=paper/...`, 8 GPUs, step 0)",
            "",
        ]
        out += component_table(data)
        out += ["", "#### What fits on 8 GPUs with vLLM", ""] + cases_table(data)
        recommended = overrides(RECOMMENDED[preset])
        same = replace(data["configured"], **RECOMMENDED[preset]) == data["configured"]
        out += [
            "",
            "Every setup planned at step 0 (the HF teacher's prefix cache at its largest, the whole 8192-token cap) "
            "and at the last steps (cap 0: no prefixes, so nothing empties torch's cache between the weight sync and "
            "the student engine's wake); the two bound every step, and the engines' shares do not depend on the cap. "
            "*As configured* and *recommended*: one "
            "engine, the student's; the HF teacher writes the prefixes in calls of `rollout.generation_batch_size` "
            "rows (*HF* in the teacher columns). *Two engines (alternative)*: a teacher engine writes them "
            f"(`{overrides(TWO_ENGINES[preset])}`), which needs `{TWO_ENGINE_ENV}` (each engine in its own process: "
            "vLLM's sleep mode allows one engine per process; the weight sync then goes through `collective_rpc` "
            "and host RAM: the fp32 student copied there, in the *host RAM* column beside the sleeping engines' "
            "weights) and has not run on a GPU here; the HF teacher's prefix cache then never exists. *Room*: "
            "the most GPU share each engine may take (`gpu_memory_utilization`, `teacher_gpu_memory_utilization`) "
            "with every step's peak and the startup within the fit line: the student engine's beside the rest of "
            "the sampling phase (with one engine: nothing of torch's once the HF teacher's prefixes are written, the "
            "weight sync's cached blocks at the last steps), the teacher engine's beside the student engine's "
            "weights; the engines are awake one at a time, so two shares do not add up. "
            "*Rollouts held at once*: `max_model_len` sequences an engine's KV pool holds (its share less its bf16 "
            "weights, an upper bound); fewer than 64 and vLLM queues the rest (waves, in the step times). "
            + (
                f"Recommended for 8 x H100 and 8 x H200 alike: the preset as configured, `{recommended}`"
                if same
                else f"Recommended for 8 x H100 and 8 x H200 alike: `{recommended}`"
            )
            + f" (every phase of step 0 and of the last steps, and the startup, within {HEADROOM:.0%} of an H100).",
        ]
        out += ["", "#### The HF loop instead (`rollout.backend=loop`, 8 GPUs, `optim.micro_batches=16`)", ""]
        out += loop_table(data)
        singles = []
        for r in data["single"]:
            if r.get("recommended"):
                singles.append(
                    f"{r['gpu']}: `rollout.generation_batch_size={r['recommended']}` ({r['chunks']} sampling calls "
                    f"per rollout), about {r['run_h']:.0f} h for {STEPS} steps"
                )
            else:
                singles.append(f"{r['gpu']}: does not fit")
        out += [
            "",
            "The recommended value is the smallest with as many sampling calls as the largest that fits step 0's "
            "bound (same time, less memory); `generation_batch_size` changes the samples (each chunk draws its own "
            "noise), not their distribution. One GPU with the paper's 512 rollouts (HF loop, checkpointing, one "
            "sequence per micro-batch): " + "; ".join(singles) + ".",
        ]
        out += [
            "",
            "#### The HF sampler over the whole rank batch (`generation_batch_size=0`, prompts at 512, `scoring.chunk_size=512`)",
            "",
        ] + fit_table(data)
        out += ["", "#### Step time (8 GPUs, estimate)", ""] + step_table(data)
    out += [
        "",
        "Step-time assumptions: every response (and every teacher prefix) runs to the cap, so a guided row's "
        "student continuation is `8192 - cap`; compute at 35% of the dense bf16 peak (989 TFLOP/s); decode reads "
        "the sampling weights and the KV cache of the rows decoding together once per token at 70% of HBM "
        "bandwidth (H100 3.35 TB/s, H200 4.8 TB/s) and, with the HF loop, takes at least 0.6 ms per decoder "
        "layer per token (kernel-launch bound eager PyTorch; vLLM's CUDA graphs assumed free of it). HF sampling "
        "calls (`generation_batch_size` rows each: the student's with the loop, the HF teacher's prefixes in every "
        "setup without a teacher engine) run one after the other; an engine whose pool holds fewer rows than the "
        "rank's runs them in waves (the rows spread evenly over them). `decode bound` is the bandwidth bound alone. "
        "Step 0: the teacher writes 8192-token prefixes and the student nothing more; "
        f"`{STEPS} steps h` sums every step at its cosine cap. The weight sync is not in the step times (with two "
        "engines it goes through host RAM).",
    ]
    if measured is not None:
        out += ["", "### Measured vs planned (CPU)", ""] + measured_section(measured)
        out += ["", MEASURED_TAG + json.dumps(measured, separators=(",", ":")) + " -->"]
    machine = env["machine"]
    versions = env["versions"]
    out += [
        "",
        f"Generated on {machine['cpu']}, {machine['cores']} cores, {machine['ram_gib']} GiB RAM; "
        f"Python {versions['python']}, torch {versions.get('torch')}, transformers {versions.get('transformers')}.",
        MD_END,
    ]
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--no-measure", action="store_true", help="skip the CPU measurement (keep the one already in --out-md)"
    )
    parser.add_argument("--out-md", type=Path, default=SCALING_MD)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures as JSON here")
    parser.add_argument(
        "--measured-json", type=Path, default=None, help="reuse the `measured` entry of an earlier --json file"
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child_main()
        return
    reference = {"r1-1.5b<-skywork-7b": 16, "qwen3-1.7b<-qwen3-4b": 16}
    computed = compute(reference)
    if args.measured_json:
        measured = json.loads(args.measured_json.read_text())["measured"]
    else:
        measured = previous_measurement(args.out_md) if args.no_measure else measure()
    machine, versions = environment(["torch", "transformers"])
    section = markdown(computed, measured, {"machine": machine, "versions": versions})
    print(section)
    write_section(args.out_md, section, MD_START, MD_END)
    if args.json:
        payload = {
            "presets": {
                k: {
                    "configured": asdict(v["configured"]),
                    "components_step0": {gpu: [asdict(c) for c in plan.components] for gpu, plan in v["plans"].items()},
                    "vllm_cases": v["cases"],
                    "loop": v["loops"],
                    "recommended": RECOMMENDED[k],
                    "two_engines": TWO_ENGINES[k],
                    "hf_sampler_fits": v["fits"],
                    "single_gpu": v["single"],
                    "steps": {
                        f"{g} / {label}": {
                            "late steps": asdict(e["late steps"]),
                            "step 0": asdict(e["step 0"]),
                            "run_s": e["run_s"],
                        }
                        for (g, label), e in v["steps"].items()
                    },
                }
                for k, v in computed["presets"].items()
            },
            "measured": measured,
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
