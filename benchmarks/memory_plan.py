"""Per-GPU memory and step-time planning for the paper's two runs, and one CPU measurement to check the plan.

Computed (``tropd_cli.planning``, no GPU needed): every component tropd holds per GPU for
R1-Distill-Qwen-1.5B <- Skywork-OR1-Math-7B and Qwen3-1.7B <- Qwen3-4B at the paper's settings
(128 prompts x 4 rollouts, 8192 new tokens, top-k 64) on 1 and 8 GPUs, the fewest
``optim.micro_batches`` that fit an 80 GB H100 and a 141 GB H200, and a FLOP / bandwidth step time.

Measured (CPU, a fresh child process): one training step of the default ``tropd train`` config
(teacher SmolLM2-135M-Instruct, 16-layer student), resident memory before and after loading, after the
first step, and the peak of the second step (kernel high-water mark, ``/proc/self/clear_refs`` +
``VmHWM``), next to the plan for the same shapes.

Usage::

    python benchmarks/memory_plan.py               # tables + CPU measurement (a few minutes); writes docs/scaling.md
    python benchmarks/memory_plan.py --no-measure  # tables only (a second; keeps the measurement in the doc)
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


def step0(run: RunShape) -> RunShape:
    """Guidance at step 0: the prefix cap is the whole response budget (cosine schedule)."""
    return replace(run, prefix_tokens=run.response_tokens)


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


def largest_single_gpu_batch(preset: str, gpu: GPU, *, prefix: bool) -> int:
    """The most sequences (a multiple of 4 rollouts) one GPU can sample and train on, checkpointing on."""
    best = 0
    for seqs in range(4, 513, 4):
        run = planning.paper_run(preset, sequences=seqs, gradient_checkpointing=True)
        run = step0(run) if prefix else run
        if planning.smallest_micro_batches(run, gpu, USABLE) is None:
            break
        best = seqs
    return best


def vllm_row(run: RunShape, gpu: GPU) -> dict[str, Any]:
    """The largest gpu_memory_utilization the sampling phase leaves room for (the engine sleeps outside
    it), and whether that KV pool holds the rank's rollouts at full length."""
    base = plan_memory(replace(run, backend="vllm", vllm_gpu_memory_utilization=0.0), gpu)
    sampling = base.persistent + base.phase_total("sampling")
    util = max(0.0, (USABLE * gpu.memory_bytes - sampling) / gpu.memory_bytes)
    weights = planning.param_counts(run.student).total * 2
    pool = util * gpu.memory_bytes - weights
    demand = planning.kv_cache_bytes(run.student, run.sequences_per_rank, run.seq_len)
    return {
        "max_utilization": util,
        "pool_gib": pool / GiB,
        "demand_gib": demand / GiB,
        "rest_peak_gib": base.peak / GiB,
        "rest_phase": base.peak_phase,
    }


def compute(micro_batches: dict[str, int]) -> dict[str, Any]:
    out: dict[str, Any] = {"presets": {}}
    for preset in planning.PRESETS:
        ref = planning.paper_run(preset, world_size=8, gradient_checkpointing=True, micro_batches=micro_batches[preset])
        plans = {"late": plan_memory(ref), "step0": plan_memory(step0(ref))}
        no_ckpt = plan_memory(replace(ref, gradient_checkpointing=False))
        fits = []
        for n in (8, 1):
            for ckpt in (False, True):
                for prefix in (False, True):
                    run = planning.paper_run(preset, world_size=n, gradient_checkpointing=ckpt)
                    run = step0(run) if prefix else run
                    for gpu in (H100, H200):
                        fits.append({"gpus": n, "ckpt": ckpt, "prefix": prefix, "gpu": gpu.name, **fit_row(run, gpu)})
        single = {
            gpu.name: {p: largest_single_gpu_batch(preset, gpu, prefix=p) for p in (False, True)}
            for gpu in (H100, H200)
        }
        steps = {}
        for gpu in (H100, H200):
            for label, run in (
                ("loop, late steps", ref),
                ("loop, step 0", step0(ref)),
                ("vllm, late steps", replace(ref, backend="vllm")),
            ):
                steps[(gpu.name, label)] = planning.estimate_step(run, gpu)
        out["presets"][preset] = {
            "ref": ref,
            "plans": plans,
            "no_ckpt": no_ckpt,
            "fits": fits,
            "single": single,
            "vllm": {gpu.name: vllm_row(ref, gpu) for gpu in (H100, H200)},
            "teacher_prefix_kv": planning.kv_cache_bytes(
                ref.teacher, ref.sequences_per_rank, ref.prompt_tokens + ref.response_tokens - 1
            ),
            "steps": steps,
        }
    return out


# ---------------------------------------------------------------------------------------------
# Measured: one CPU training step of the default `tropd train` config


def child_main() -> None:
    import torch
    from hydra import compose, initialize_config_dir
    from loss_memory import PeakMeter, rss_bytes
    from omegaconf import OmegaConf

    from tropd_cli.config import register_configs, validate_train
    from tropd_cli.data import examples_from_config
    from tropd_cli.models import default_cache_dir, load_pair
    from tropd_cli.trainer import Trainer

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
    trainer = Trainer(cfg, teacher=teacher, student=student, examples=examples)
    gc.collect()
    rss1 = rss_bytes()
    shapes: list[dict[str, int]] = []
    make_batch = trainer.make_batch

    def recording(step: int):
        batch = make_batch(step)
        shapes.append(
            {
                "rows": int(batch.input_ids.shape[0]),
                "prompt": int(batch.prompt_len),
                "response": int(batch.response_mask.shape[1]),
                "prefix": int(batch.prefix_mask.sum(-1).max()),
            }
        )
        return batch

    trainer.make_batch = recording  # type: ignore[method-assign]
    caches: dict[str, dict[int, Any]] = {"student": {}, "teacher": {}}

    def capture(role: str):
        def hook(module, args, kwargs):
            cache = kwargs.get("past_key_values")
            if cache is not None:
                caches[role][id(cache)] = cache

        return hook

    handles = [
        trainer.sampler.register_forward_pre_hook(capture("student"), with_kwargs=True),
        teacher.model.register_forward_pre_hook(capture("teacher"), with_kwargs=True),
    ]
    t0 = time.perf_counter()
    trainer.step(0)
    gc.collect()
    rss2 = rss_bytes()
    for seen in caches.values():
        seen.clear()
    meter = PeakMeter()
    meter.reset()
    trainer.step(1)
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
        "sampler_dtype": str(next(trainer.sampler.parameters()).dtype).removeprefix("torch."),
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
    "sampling": "sampling",
    "teacher_scoring": "teacher scoring",
    "training": "training",
    "optimizer": "optimizer step",
}


def component_table(data: dict[str, Any]) -> list[str]:
    ref: RunShape = data["ref"]
    late: MemoryPlan = data["plans"]["late"]
    first: MemoryPlan = data["plans"]["step0"]
    no_ckpt: MemoryPlan = data["no_ckpt"]
    b = ref.micro_batch_sequences
    lines = [
        f"8 GPUs, {ref.sequences_per_rank} rollouts per GPU, `optim.micro_batches={ref.micro_batches}` "
        f"({b} sequences of up to {ref.seq_len} tokens per micro-batch), `student.gradient_checkpointing=true`, "
        "bf16 compute (FSDP2 mixed precision), bf16 sampler copy and teacher (replicated).",
        "",
        "| component | phase | GiB per GPU | what |",
        "|---|---|---|---|",
    ]
    for c in late.components:
        if c.phase == "sampling":
            continue
        label = c.name.replace("_", " ")
        lines.append(f"| {label} | {PHASE_LABEL[c.phase]} | {gib(c.bytes)} | {c.note} |")
        if c.name == "activations":
            alt = no_ckpt.get("activations")
            lines.append(
                f"| activations without checkpointing | (training) | {gib(alt)} | same micro-batch, not counted above |"
            )
    for label, plan in (("late steps (no prefix)", late), ("step 0 (prefix cap 8192)", first)):
        for c in plan.components:
            if c.phase == "sampling":
                lines.append(f"| {c.name.replace('_', ' ')}, {label} | sampling | {gib(c.bytes)} | {c.note} |")
    lines.append("")
    lines.append(
        "| phase | late steps GiB | step 0 GiB |\n|---|---|---|\n"
        + "\n".join(
            f"| always + {PHASE_LABEL[p]} | {gib(late.persistent + late.phase_total(p))} | "
            f"{gib(first.persistent + first.phase_total(p))} |"
            for p in planning.PHASES
        )
        + f"\n| **peak** | **{gib(late.peak)}** ({PHASE_LABEL[late.peak_phase]}) | "
        f"**{gib(first.peak)}** ({PHASE_LABEL[first.peak_phase]}) |"
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
    ref: RunShape = data["ref"]
    lines = [
        "| GPU | rollouts | teacher PFLOP | student PFLOP | teacher s | student s | decode bound s | decode s | step s | 200 steps h | new tokens/s (all GPUs) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (gpu, label), est in data["steps"].items():
        tokens = ref.sequences * ref.response_tokens
        lines.append(
            f"| {gpu.split()[0]} | {label} | {est.teacher_flops / 1e15:.1f} | {est.student_flops / 1e15:.1f} | "
            f"{est.teacher_s:.0f} | {est.student_s:.0f} | {est.decode_bound_s:.0f} | {est.decode_s:.0f} | "
            f"{est.total_s:.0f} | {est.total_s * 200 / 3600:.1f} | {tokens / est.total_s:,.0f} |"
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


def markdown(computed: dict[str, Any], measured: dict[str, Any] | None, env: dict[str, Any]) -> str:
    out = [MD_START, "## Planning figures (generated)", ""]
    out.append(
        "Regenerate with `python benchmarks/memory_plan.py` (tables: `--no-measure`, a second). "
        "All figures per GPU, GiB = 2^30 bytes; a plan *fits* when its peak is within "
        f"{USABLE:.0%} of the GPU's memory (H100: {H100.memory_bytes / GiB:.1f} GiB, H200: "
        f"{H200.memory_bytes / GiB:.1f} GiB); the rest is for the CUDA context, NCCL and allocator fragmentation. "
        "Paper settings throughout: 128 prompts x 4 rollouts = 512 sequences per step, up to 8192 new tokens, "
        "prompts planned at 512 tokens, top-k 64, `scoring.chunk_size=512`."
    )
    out += ["", "### Models", ""] + models_table()
    for preset, data in computed["presets"].items():
        out += ["", f"### {PRESET_TITLES[preset]}", "", "#### Components"]
        out += [""] + component_table(data)
        out += ["", "#### What fits", ""] + fit_table(data)
        single = data["single"]
        out += [
            "",
            "One GPU cannot hold the paper's 512 rollouts with the HF sampler: the largest rollout batch "
            "(`rollout.batch_size x n_samples_per_prompt`) one GPU fits, with checkpointing and the best "
            "`optim.micro_batches`: "
            + "; ".join(
                f"{g.split()[0]}: {v[False]} sequences in late steps, {v[True]} at step 0" for g, v in single.items()
            )
            + ".",
        ]
        v = data["vllm"]
        out += [
            "",
            "With `rollout.backend=vllm` (no sampler copy and no HF cache; the engine sleeps outside sampling; "
            "the teacher's guidance prefixes still come from the HF loop), the most `gpu_memory_utilization` "
            "the sampling phase of the late steps leaves room for, at the micro-batches above: "
            + "; ".join(
                f"{g.split()[0]}: {r['max_utilization']:.2f}, a {r['pool_gib']:.0f} GiB KV pool for "
                f"{r['demand_gib']:.0f} GiB of full-length rollouts per GPU (the rest of the step peaks at "
                f"{r['rest_peak_gib']:.0f} GiB, {PHASE_LABEL[r['rest_phase']]})"
                for g, r in v.items()
            )
            + ". A pool smaller than the rollouts makes vLLM queue or preempt sequences: slower, not out of memory. "
            f"At step 0 the teacher's HF-loop cache for 8192-token prefixes ({gib(data['teacher_prefix_kv'])} GiB "
            "per GPU) must fit as well, beside the engine unless the engine sleeps while the teacher writes.",
        ]
        out += ["", "#### Step time (8 GPUs, estimate)", ""] + step_table(data)
    out += [
        "",
        "Step-time assumptions: every response runs to 8192 tokens; compute at 35% of the dense bf16 peak "
        "(989 TFLOP/s); decode reads the sampler's weights and the whole KV cache once per token at 70% of "
        "HBM bandwidth (H100 3.35 TB/s, H200 4.8 TB/s) and, with the HF loop, takes at least 0.6 ms per "
        "decoder layer per token (kernel-launch bound eager PyTorch; vLLM's CUDA graphs assumed free of it). "
        "`decode bound` is the bandwidth bound alone. Step 0 adds the teacher writing 8192-token prefixes.",
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
                    "ref": asdict(v["ref"]),
                    "late": [asdict(c) for c in v["plans"]["late"].components],
                    "step0": [asdict(c) for c in v["plans"]["step0"].components],
                    "fits": v["fits"],
                    "single_gpu_sequences": v["single"],
                    "vllm": v["vllm"],
                    "steps": {f"{g} / {label}": asdict(e) for (g, label), e in v["steps"].items()},
                }
                for k, v in computed["presets"].items()
            },
            "measured": measured,
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
