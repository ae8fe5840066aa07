"""A run's shape (:class:`RunShape`) and its per-GPU memory plan (:func:`plan_memory`), with the searches
that use it (fewest micro-batches, largest generation batch, vLLM engine room)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from tropd_cli.planning.shapes import (
    BF16,
    DTYPE_BYTES,
    FP32,
    GPU,
    INT64,
    GiB,
    ModelShape,
    ParamCounts,
    inference_bytes_per_token,
    kv_cache_bytes,
    linear_weights,
    param_counts,
    training_activation_bytes,
)

# ---------------------------------------------------------------------------------------------
# A run and its memory plan


@dataclass(frozen=True)
class RunShape:
    """What memory depends on in a ``tropd train`` run (config keys in the comments)."""

    student: ModelShape
    teacher: ModelShape
    world_size: int = 1
    sequences: int = 512  # rollout.batch_size x rollout.n_samples_per_prompt, all ranks together
    prompt_tokens: int = 512  # prompt width after left-padding (<= dataset.max_prompt_tokens)
    response_tokens: int = 8192  # rollout.max_new_tokens
    prefix_tokens: int = 0  # guidance prefix cap at the step planned (step 0: max_new_tokens; late steps: about 0)
    micro_batches: int = 1  # optim.micro_batches (x method.mini_batches)
    chunk_size: int = 512  # scoring.chunk_size
    top_k: int = 64  # method.top_k
    gradient_checkpointing: bool = False  # student.gradient_checkpointing
    shard_teacher: bool = False  # distributed.shard_teacher
    precision: str = "bf16"  # precision: student compute, bf16 (a bf16 GPU's auto) or fp32
    sampler_dtype: str = "bfloat16"  # rollout.sampler_dtype as resolved
    teacher_dtype: str = "bfloat16"  # teacher.dtype as resolved
    backend: str = "loop"  # rollout.backend: loop / generate (HF cache) or vllm
    # rollout.generation_batch_size: rows one HF sampling call holds (0: all), the student's (loop / generate)
    # and the HF teacher's guidance prefixes (any backend without a teacher engine writing them)
    generation_batch_size: int = 0
    guidance: bool = True  # guidance.enabled (the teacher writes prefixes at every step whose cap is > 0)
    vllm_gpu_memory_utilization: float = 0.3  # rollout.vllm.gpu_memory_utilization: the student engine's share
    vllm_teacher_gpu_memory_utilization: float = 0.2  # rollout.vllm.teacher_gpu_memory_utilization
    vllm_teacher_prefixes: bool = False  # rollout.vllm.teacher_prefixes: a teacher engine writes the prefixes
    vllm_teacher_scoring: bool = False  # rollout.vllm.teacher_scoring: ... and scores the rollouts
    vllm_sleep: bool = True  # rollout.vllm.enable_sleep_mode: engines asleep (level 1) outside their use
    served_teacher: bool = False  # teacher.backend=server: the teacher is on its own server, not on these GPUs
    # VLLM_ENABLE_V1_MULTIPROCESSING=1: every engine core in its own process (tropd sets 0 unless the user did).
    # vLLM's sleep mode allows one engine per process, so a teacher engine beside a sleeping student engine
    # needs it (validate.validate_train refuses the run otherwise; ``MemoryPlan.problems`` says so). The weight
    # sync then goes through ``collective_rpc``: the fp32 student copied to host RAM on every rank.
    vllm_multiprocessing: bool = False
    # Whether torch.cuda.empty_cache() runs before an engine wakes. tropd calls it (generate.make_batch before
    # the weight sync wakes the student engine, EngineSamplers.after_prefixes once the HF teacher's prefixes are
    # written and before the student engine wakes whole, step.score_teacher before a sleeping teacher
    # engine wakes to score). False plans the code before those calls, for comparison: vLLM maps an engine's
    # memory outside torch's caching allocator, so without them the blocks torch cached during the previous
    # step's scoring, backward and optimizer step stay reserved beside the waking engines
    # (``torch_cache_held``), and so do those of the HF teacher's prefixes (``teacher_prefix_blocks_held``).
    release_torch_cache: bool = True

    @property
    def sequences_per_rank(self) -> int:
        if self.sequences % self.world_size:
            raise ValueError(f"{self.sequences} sequences do not split over {self.world_size} ranks")
        return self.sequences // self.world_size

    @property
    def micro_batch_sequences(self) -> int:
        """The largest micro-batch (trainer: ``min(micro_batches, rows)`` near-equal parts)."""
        parts = max(1, min(self.micro_batches, self.sequences_per_rank))
        return -(-self.sequences_per_rank // parts)

    @property
    def seq_len(self) -> int:
        """Training / scoring width: the prompt, then the response (guidance prefix included)."""
        return self.prompt_tokens + self.response_tokens

    @property
    def training_precision(self) -> str:
        """Activation model: fp32, autocast (one GPU, bf16) or bf16 (FSDP mixed precision)."""
        if self.precision == "fp32":
            return "fp32"
        return "bf16" if self.world_size > 1 else "autocast"

    @property
    def generation_rows(self) -> int:
        """Rows one HF sampling call holds (``rollout.sample``: chunks of ``generation_batch_size`` rows)."""
        rows = self.sequences_per_rank
        return min(self.generation_batch_size, rows) if self.generation_batch_size > 0 else rows

    @property
    def generation_chunks(self) -> int:
        """HF sampling calls per rank and rollout, one after the other."""
        return -(-self.sequences_per_rank // self.generation_rows)

    @property
    def teacher_engine(self) -> bool:
        """``engines.start_engines`` starts a teacher engine (it writes prefixes and/or scores)."""
        return self.backend == "vllm" and (self.vllm_teacher_scoring or (self.vllm_teacher_prefixes and self.guidance))

    @property
    def max_model_len(self) -> int:
        """The engines' ``max_model_len`` (``dataset.max_prompt_tokens + rollout.max_new_tokens``)."""
        return self.prompt_tokens + self.response_tokens


@dataclass(frozen=True)
class Component:
    name: str
    phase: str  # persistent | sampling | teacher_scoring | training | optimizer | startup | host
    bytes: int
    note: str = ""


# In the order of a step: the teacher writes the guidance prefixes, the student samples (continues them),
# the teacher scores, the student trains (one micro-batch at a time), the optimizer steps.
PHASES = ("prefixes", "sampling", "teacher_scoring", "training", "optimizer")


@dataclass
class MemoryPlan:
    """Named per-GPU components; the peak is the persistent state plus the largest phase.

    Two more figures stand apart: ``startup`` (the models as loaded, before FSDP shards them, plus the
    share an engine asks for when it starts) and ``host`` (host RAM per rank: engine weights while asleep).
    """

    run: RunShape
    components: list[Component] = field(default_factory=list)
    gpu: GPU | None = None

    def add(self, name: str, phase: str, nbytes: float, note: str = "") -> None:
        self.components.append(Component(name, phase, int(nbytes), note))

    def get(self, name: str) -> int:
        return sum(c.bytes for c in self.components if c.name == name)

    def phase_total(self, phase: str) -> int:
        return sum(c.bytes for c in self.components if c.phase == phase)

    @property
    def persistent(self) -> int:
        return self.phase_total("persistent")

    @property
    def peak_phase(self) -> str:
        return max(PHASES, key=self.phase_total)

    @property
    def peak(self) -> int:
        return self.persistent + self.phase_total(self.peak_phase)

    @property
    def startup(self) -> int:
        return self.phase_total("startup")

    @property
    def host(self) -> int:
        return self.phase_total("host")

    def problems(self, gpu: GPU, usable: float = 0.9) -> list[str]:
        """Why the plan does not fit ``gpu`` (empty: it fits)."""
        limit = usable * gpu.memory_bytes
        out = []
        if self.peak > limit:
            out.append(f"peak {self.peak / GiB:.1f} GiB ({self.peak_phase}) > {limit / GiB:.1f} GiB")
        if self.startup > limit:
            out.append(f"startup {self.startup / GiB:.1f} GiB > {limit / GiB:.1f} GiB")
        if self.run.backend == "vllm":
            if self.run.teacher_engine and self.run.vllm_sleep and not self.run.vllm_multiprocessing:
                out.append(
                    "a teacher engine beside the sleeping student engine needs VLLM_ENABLE_V1_MULTIPROCESSING=1 "
                    "(vLLM's sleep mode allows one engine per process)"
                )
            roles = ["student"] + (["teacher"] if self.run.teacher_engine else [])
            for role in roles:
                if vllm_concurrent_rows(self.run, gpu, role) < 1:
                    out.append(f"the {role} engine's KV pool cannot hold one {self.run.max_model_len}-token sequence")
        return out

    def fits(self, gpu: GPU, usable: float = 0.9) -> bool:
        """Peak and startup within ``usable`` of the GPU (the rest: CUDA context, NCCL buffers, allocator
        fragmentation), every vLLM engine's KV pool holds at least one ``max_model_len`` sequence, and two
        sleeping engines run in processes of their own (``vllm_multiprocessing``)."""
        return not self.problems(gpu, usable)


def _sampling_sub_phase(
    m: ModelShape, rows: int, prompt: int, new_tokens: int, dtype_bytes: int
) -> tuple[int, int, str]:
    """(KV cache, other temporaries, which moment) at the peak of one HF-loop sampling call.

    Prefill: the cache of ``prompt`` positions plus one layer's temporaries over all ``rows x prompt``
    tokens (the loop prefills the whole call at once). Decode: the cache at its longest, ``prompt +
    new_tokens - 1`` positions (the last sampled token is never fed back), one layer's cache twice
    while ``torch.cat`` grows it, and the last position's logits (model dtype, fp32 copy, probabilities).
    """
    final = prompt + max(new_tokens, 1) - 1
    kv_prefill = kv_cache_bytes(m, rows, prompt, dtype_bytes)
    prefill = rows * prompt * inference_bytes_per_token(m, prompt, dtype_bytes)
    kv_final = kv_cache_bytes(m, rows, final, dtype_bytes)
    decode = kv_final // max(1, m.layers) + rows * m.vocab * (dtype_bytes + 2 * FP32)
    if kv_prefill + prefill > kv_final + decode:
        return kv_prefill, prefill, f"prefill of {rows} rows x {prompt} positions"
    return kv_final, decode, f"decode, {rows} rows x up to {final} positions"


def sampling_kv_cache_bytes(run: RunShape, role: str = "student") -> int:
    """The largest ``DynamicCache`` one HF sampling call of ``run`` reaches (the end of its decode).

    Student: ``generation_rows`` rows x (prompt + prefix cap + a whole response - 1) positions: a call's
    rows are left-padded to its longest context, and it decodes until its longest budget is spent (a row
    with no or a short prefix has a whole response). Teacher (guidance prefixes): ``generation_rows`` rows x
    (prompt + prefix cap - 1). The last sampled token is never fed back, hence the - 1.
    """
    if role == "student":
        positions = run.prompt_tokens + run.prefix_tokens + run.response_tokens - 1
        return kv_cache_bytes(run.student, run.generation_rows, positions, DTYPE_BYTES[run.sampler_dtype])
    if role == "teacher":
        positions = run.prompt_tokens + max(run.prefix_tokens, 1) - 1
        return kv_cache_bytes(run.teacher, run.generation_rows, positions, DTYPE_BYTES[run.teacher_dtype])
    raise ValueError(f"role {role!r}: student or teacher")


def vllm_kv_pool_bytes(run: RunShape, gpu: GPU, role: str = "student") -> int:
    """An engine's paged KV pool, at most: its share of the GPU less its bf16 weights. vLLM also takes its
    profiled activation peak (and, in recent releases, its CUDA graphs) out of the share: not modelled."""
    model, share = _engine(run, role)
    return int(share * gpu.memory_bytes) - param_counts(model).total * BF16


def vllm_concurrent_rows(run: RunShape, gpu: GPU, role: str = "student") -> int:
    """Sequences of ``max_model_len`` positions the engine's pool holds at once (vLLM refuses to start
    below 1); with fewer than a rank's rollouts it queues or preempts the rest."""
    model, _ = _engine(run, role)
    return max(0, vllm_kv_pool_bytes(run, gpu, role) // kv_cache_bytes(model, 1, run.max_model_len))


def _engine(run: RunShape, role: str) -> tuple[ModelShape, float]:
    if role == "student":
        return run.student, run.vllm_gpu_memory_utilization
    if role == "teacher":
        return run.teacher, run.vllm_teacher_gpu_memory_utilization
    raise ValueError(f"role {role!r}: student or teacher")


@dataclass(frozen=True)
class _Sizes:
    """What several parts of :func:`plan_memory` derive from the run."""

    run: RunShape
    ps: ParamCounts
    pt: ParamCounts
    rows: int  # sequences per rank
    b: int  # sequences per micro-batch
    sampler_bytes: int
    teacher_bytes: int
    compute_bytes: int
    sharded: str  # note suffix for FSDP-sharded state
    vllm: bool
    sampler_copy: bool  # an HF sampling copy of the student exists
    teacher_div: int  # the teacher's shards per rank (1: whole)
    gathered_teacher: int  # the sharded teacher's root + two layers gathered
    engine_prefixes: bool  # the teacher engine writes the guidance prefixes
    hf_prefixes: bool  # the HF teacher writes them
    tokens_mb: int  # tokens of one micro-batch
    resp_mb: int  # response tokens of one micro-batch
    topk_all: int  # the teacher's top-k of the whole rank batch
    chunk: int  # scoring rows per chunk


def _sizes(run: RunShape) -> _Sizes:
    n = run.world_size
    ps, pt = param_counts(run.student), param_counts(run.teacher)
    sampler_bytes, teacher_bytes = DTYPE_BYTES[run.sampler_dtype], DTYPE_BYTES[run.teacher_dtype]
    vllm = run.backend == "vllm"
    teacher_div = n if run.shard_teacher and n > 1 else 1
    engine_prefixes = vllm and run.guidance and run.vllm_teacher_prefixes
    b = run.micro_batch_sequences
    resp_mb = b * run.response_tokens
    topk_per_token = run.top_k * (INT64 + FP32) + 2 * FP32  # ids, log-probs; log-prob and entropy of the target
    return _Sizes(
        run=run,
        ps=ps,
        pt=pt,
        rows=run.sequences_per_rank,
        b=b,
        sampler_bytes=sampler_bytes,
        teacher_bytes=teacher_bytes,
        compute_bytes=FP32 if run.precision == "fp32" else BF16,
        sharded=" / world_size (FSDP2)" if n > 1 else "",
        vllm=vllm,
        # One process with an fp32 sampler samples from the student itself; vLLM needs no HF sampler at all.
        sampler_copy=not vllm and (n > 1 or sampler_bytes != FP32),
        teacher_div=teacher_div,
        # the root (embeddings, lm_head) for the whole forward, plus two layers in flight
        gathered_teacher=(pt.embed + pt.lm_head + 2 * pt.per_layer) * teacher_bytes if teacher_div > 1 else 0,
        engine_prefixes=engine_prefixes,
        hf_prefixes=run.guidance and run.prefix_tokens > 0 and not engine_prefixes and not run.served_teacher,
        tokens_mb=b * run.seq_len,
        resp_mb=resp_mb,
        topk_all=run.sequences_per_rank * run.response_tokens * topk_per_token,
        chunk=min(run.chunk_size, resp_mb),  # a chunk never has more rows than the micro-batch's response tokens
    )


def plan_memory(run: RunShape, gpu: GPU | None = None) -> MemoryPlan:
    """Per-GPU bytes of every component of a step of ``run`` (``gpu`` needed for ``backend=vllm``), in the
    order of a step: the models, the vLLM engines, guidance prefixes and sampling, teacher scoring,
    training, the optimizer step."""
    if run.backend == "vllm" and gpu is None:
        raise ValueError("backend=vllm: pass the GPU (an engine takes a share of its memory)")
    z = _sizes(run)
    plan = MemoryPlan(run, gpu=gpu)
    _add_models(plan, z)
    if z.vllm:
        assert gpu is not None
        _add_engines(plan, z, gpu)
    _add_sampling(plan, z)
    _add_teacher_scoring(plan, z)
    _add_training(plan, z)
    _add_optimizer(plan, z)
    if z.vllm and run.vllm_sleep and not run.release_torch_cache:
        _add_torch_cache_held(plan)
    return plan


def _add_models(plan: MemoryPlan, z: _Sizes) -> None:
    """The models as loaded (startup) and what lives through the whole step (persistent)."""
    run = z.run
    n = z.run.world_size
    ps = z.ps
    pt = z.pt
    sampler_bytes = z.sampler_bytes
    teacher_bytes = z.teacher_bytes
    sharded = z.sharded
    sampler_copy = z.sampler_copy
    teacher_div = z.teacher_div
    # -- startup: the models as load_pair leaves them, before FSDP shards them --------------------
    teacher_here = 0 if run.served_teacher else pt.total * teacher_bytes
    plan.add(
        "models_loaded",
        "startup",
        ps.total * FP32 + teacher_here + (ps.total * sampler_bytes if sampler_copy else 0),
        "student whole in fp32"
        + ("" if run.served_teacher else ", teacher whole")
        + (", the sampling copy" if sampler_copy else "")
        + " (before sharding)",
    )

    # -- persistent: lives through the whole step -------------------------------------------------
    plan.add("student_weights", "persistent", ps.total * FP32 // n, f"fp32 master weights{sharded}")
    plan.add(
        "student_grads", "persistent", ps.total * FP32 // n, f"fp32, kept from backward to the next zero_grad{sharded}"
    )
    plan.add("optimizer_states", "persistent", 2 * ps.total * FP32 // n, f"AdamW exp_avg + exp_avg_sq, fp32{sharded}")
    if sampler_copy:
        plan.add(
            "sampler_copy",
            "persistent",
            ps.total * sampler_bytes,
            f"whole student in {run.sampler_dtype} on every rank",
        )
    if run.served_teacher:
        return
    plan.add(
        "teacher_weights",
        "persistent",
        pt.total * teacher_bytes // teacher_div,
        f"frozen, {run.teacher_dtype}" + (", sharded" if teacher_div > 1 else ", whole on every rank"),
    )


def _add_engines(plan: MemoryPlan, z: _Sizes, gpu: GPU) -> None:
    """vLLM engines: a share of the GPU each while awake, one engine at a time."""
    run = z.run
    ps = z.ps
    pt = z.pt
    engine_prefixes = z.engine_prefixes
    hf_prefixes = z.hf_prefixes
    # -- vLLM engines: a share of the GPU each while awake, one engine at a time ------------------------
    # With sleep mode (generate.make_batch / _score_teacher): torch's cache emptied, the weight sync wakes
    # the student engine's weights; the teacher engine wakes, writes the prefixes and sleeps (or the HF
    # teacher writes them and torch's cache is emptied: EngineSamplers.after_prefixes); the student engine wakes
    # its KV cache, continues them and sleeps; a scoring teacher engine wakes again to score.
    asleep = ", asleep (nothing on the GPU) otherwise" if run.vllm_sleep else ", always resident (no sleep mode)"
    share_s = run.vllm_gpu_memory_utilization * gpu.memory_bytes
    plan.add(
        "vllm_student_engine",
        "sampling" if run.vllm_sleep else "persistent",
        share_s,
        "gpu_memory_utilization x GPU: bf16 student, activations, paged KV pool" + asleep,
    )
    shares = [share_s]
    if run.teacher_engine:
        share_t = run.vllm_teacher_gpu_memory_utilization * gpu.memory_bytes
        shares.append(share_t)
        note = "teacher_gpu_memory_utilization x GPU: bf16 teacher, activations, paged KV pool"
        if not run.vllm_sleep:
            plan.add("vllm_teacher_engine", "persistent", share_t, note + asleep)
        else:
            if engine_prefixes:
                plan.add(
                    "vllm_teacher_engine",
                    "prefixes",
                    share_t,
                    note + ", awake while it writes the prefixes (asleep before the student engine continues them)",
                )
            if run.vllm_teacher_scoring:
                plan.add("vllm_teacher_engine_scoring", "teacher_scoring", share_t, note + ", awake while it scores")
    if run.vllm_sleep and (engine_prefixes or hf_prefixes):
        plan.add(
            "vllm_student_engine_weights",
            "prefixes",
            ps.total * BF16,
            "the student engine's bf16 weights, woken by the weight sync before the prefixes (KV cache asleep)",
        )
    # An engine starts only when its share is free (vLLM checks): the first beside the whole models, the
    # second once the first is asleep (or beside it, without sleep mode).
    plan.add(
        "engine_start",
        "startup",
        max(shares) if run.vllm_sleep else sum(shares),
        "vLLM starts an engine only with gpu_memory_utilization x GPU free",
    )
    if run.vllm_sleep:
        plan.add(
            "engine_weights_offloaded",
            "host",
            ps.total * BF16 + (pt.total * BF16 if run.teacher_engine else 0),
            "sleep level 1: every engine's bf16 weights in pinned host RAM while it sleeps",
        )
    if run.vllm_multiprocessing:
        plan.add(
            "weight_sync_host_copy",
            "host",
            ps.total * FP32,
            "collective_rpc weight sync: the fp32 student copied to host RAM (vLLM's serializer adds its own)",
        )


def _add_sampling(plan: MemoryPlan, z: _Sizes) -> None:
    """The teacher writes guidance prefixes, then the student samples (continues them)."""
    run = z.run
    s = z.run.student
    t = z.run.teacher
    n = z.run.world_size
    ps = z.ps
    rows = z.rows
    sampler_bytes = z.sampler_bytes
    teacher_bytes = z.teacher_bytes
    vllm = z.vllm
    gathered_teacher = z.gathered_teacher
    engine_prefixes = z.engine_prefixes
    hf_prefixes = z.hf_prefixes
    # -- prefixes and sampling: the teacher writes guidance prefixes, then the student continues them -------
    # HF backends sample `generation_rows` rows at a time (longest contexts first, each chunk cut to its own
    # width); each row stops at its own budget, max_new_tokens - len(prefix), but a chunk's cache grows until
    # its last row is done: bound by its longest context (prompt + prefix cap) plus the longest budget in it
    # (a whole response when it also holds a row with a short or no prefix). A vLLM engine's KV pool is part
    # of its share; each request's max_tokens is its row's own budget.
    g = run.generation_rows
    chunks = f" (chunks of {g} rows)" if g < rows else ""
    if not vllm:
        kv, other, moment = _sampling_sub_phase(
            s, g, run.prompt_tokens + run.prefix_tokens, run.response_tokens, sampler_bytes
        )
        plan.add("rollout_kv_cache", "sampling", kv, f"student {moment}{chunks}")
        plan.add(
            "sampling_temporaries",
            "sampling",
            other,
            "prefill: one layer over a call's rows; decode: logits, cache growth",
        )
    if hf_prefixes:
        t_kv, t_other, moment = _sampling_sub_phase(t, g, run.prompt_tokens, run.prefix_tokens, teacher_bytes)
        t_other += gathered_teacher
        plan.add("teacher_prefix_kv_cache", "prefixes", t_kv, f"teacher (guidance prefixes, HF loop) {moment}{chunks}")
        plan.add(
            "teacher_prefix_temporaries",
            "prefixes",
            t_other,
            "prefill: one layer over a call's rows; decode: logits, cache growth"
            + ("; the sharded teacher's root + 2 layers gathered" if gathered_teacher else ""),
        )
        # tropd empties torch's cache once the HF teacher's prefixes are written (EngineSamplers.after_prefixes); without
        # that (release_torch_cache=False, the older code) their blocks stay reserved when the student engine wakes.
        if vllm and run.vllm_sleep and not run.release_torch_cache:
            plan.add(
                "teacher_prefix_blocks_held",
                "sampling",
                t_kv + t_other,
                "blocks torch cached for the HF teacher's prefixes, still reserved when the student engine wakes",
            )
    # The sync runs before the prefixes and torch keeps its blocks cached: through the prefixes, and beside the
    # student engine unless something empties torch's cache in between. With the HF teacher's prefixes under vLLM
    # tropd does (EngineSamplers.after_prefixes); a teacher engine's sleep does not (it runs in a process of its own).
    if n > 1:
        largest = max(ps.embed, ps.lm_head, ps.per_layer)
        note = "one parameter gathered whole in fp32 to re-sync the sampler"
        if engine_prefixes or hf_prefixes:
            plan.add("sampler_sync", "prefixes", largest * FP32, note + ", its blocks still cached")
        if not (vllm and hf_prefixes and run.release_torch_cache):
            plan.add(
                "sampler_sync",
                "sampling",
                largest * FP32,
                note + (", its blocks still cached beside the engine" if vllm else ""),
            )


def _add_teacher_scoring(plan: MemoryPlan, z: _Sizes) -> None:
    """Every micro-batch scored by the teacher before the update."""
    run = z.run
    t = z.run.teacher
    teacher_bytes = z.teacher_bytes
    vllm = z.vllm
    gathered_teacher = z.gathered_teacher
    tokens_mb = z.tokens_mb
    resp_mb = z.resp_mb
    topk_all = z.topk_all
    chunk = z.chunk
    # -- teacher scoring: every micro-batch scored before the update --------------------------------
    if not (vllm and run.vllm_teacher_scoring) and not run.served_teacher:
        plan.add(
            "teacher_forward",
            "teacher_scoring",
            tokens_mb * (inference_bytes_per_token(t, run.seq_len, teacher_bytes) + t.hidden * teacher_bytes)
            + resp_mb * t.hidden * teacher_bytes
            + gathered_teacher,
            "one micro-batch: a layer's temporaries, last hidden states",
        )
        plan.add(
            "teacher_scoring_chunks",
            "teacher_scoring",
            chunk * t.vocab * (teacher_bytes + 2 * FP32),
            "chunk x V: the product, its fp32 copy, one fp32 temporary",
        )
    plan.add("teacher_topk", "teacher_scoring", topk_all, f"k={run.top_k} ids + log-probs, whole rank batch")


def _add_training(plan: MemoryPlan, z: _Sizes) -> None:
    """One micro-batch forward + backward."""
    run = z.run
    s = z.run.student
    n = z.run.world_size
    ps = z.ps
    b = z.b
    compute_bytes = z.compute_bytes
    resp_mb = z.resp_mb
    topk_all = z.topk_all
    chunk = z.chunk
    # -- training: one micro-batch forward + backward, then the optimizer step -----------------------
    plan.add("teacher_topk_held", "training", topk_all, "the teacher's top-k, held until the update is done")
    plan.add(
        "activations",
        "training",
        training_activation_bytes(s, b, run.seq_len, run.training_precision, checkpointing=run.gradient_checkpointing)
        + b * run.seq_len * s.hidden * FP32,  # gradient of the final hidden states
        f"{b} sequences x {run.seq_len} tokens, "
        + ("checkpointed" if run.gradient_checkpointing else "no checkpointing"),
    )
    lm_head = s.vocab * s.hidden
    plan.add(
        "scoring_temporaries",
        "training",
        chunk * s.vocab * (2 * FP32 + (BF16 if compute_bytes == BF16 else 0))
        + lm_head * (FP32 + (BF16 if compute_bytes == BF16 else 0))
        + resp_mb * s.hidden * (compute_bytes + FP32)
        + 8 * resp_mb * run.top_k * FP32,
        "2 fp32 chunk x V buffers, lm_head gradient before accumulation, response hidden states, top-k loss terms",
    )
    if n > 1:
        # FSDP2: the root (embeddings, final norm, lm_head) stays gathered for the whole forward + backward,
        # plus the current and the prefetched layer, in the compute dtype; one layer's unsharded fp32 grads.
        plan.add(
            "fsdp_gathered",
            "training",
            (ps.embed + ps.lm_head + 2 * ps.per_layer) * compute_bytes + ps.per_layer * FP32,
            "root + 2 layers gathered, one layer's grads before reduce-scatter",
        )
    elif compute_bytes == BF16:
        plan.add(
            "autocast_weight_copies",
            "training",
            (linear_weights(s) + lm_head) * BF16,
            "bf16 casts of every layer matmul weight and the lm_head, saved for backward",
        )


def _add_optimizer(plan: MemoryPlan, z: _Sizes) -> None:
    """clip_grad_norm_ and AdamW (foreach), activations gone."""
    n = z.run.world_size
    ps = z.ps
    sharded = z.sharded
    topk_all = z.topk_all
    # -- optimizer: clip_grad_norm_ and AdamW (foreach), activations gone ---------------------------
    plan.add("teacher_topk_held", "optimizer", topk_all, "the teacher's top-k, still referenced")
    plan.add(
        "adamw_temporaries",
        "optimizer",
        ps.total * FP32 // n,
        f"foreach AdamW's sqrt(exp_avg_sq) / bias correction + eps: one parameter-sized fp32 buffer{sharded}",
    )


def _add_torch_cache_held(plan: MemoryPlan) -> None:
    """What torch would keep cached when the engines wake (``release_torch_cache=False``: the code before)."""
    # -- what torch would keep cached when the engines wake (release_torch_cache=False: the code before) ----
    # An engine maps its memory with the CUDA driver, outside torch's caching allocator, and vLLM empties
    # torch's cache when an engine goes to sleep, not when it wakes. Without tropd's empty_cache() before the
    # wake, the blocks torch cached for the previous step's scoring, backward and optimizer step would still
    # be reserved beside the waking engines: their phases would hold torch's high-water mark of those phases.
    torch_phase = {
        p: sum(c.bytes for c in plan.components if c.phase == p and not c.name.startswith("vllm_")) for p in PHASES
    }
    high = max(torch_phase[p] for p in ("teacher_scoring", "training", "optimizer"))
    for p in ("prefixes", "sampling"):
        if any(c.phase == p and c.name.startswith("vllm_") for c in plan.components):
            plan.add(
                "torch_cache_held",
                p,
                max(0, high - torch_phase[p]),
                "blocks torch cached in the last step's scoring / training, still reserved beside the engine",
            )


def smallest_micro_batches(run: RunShape, gpu: GPU, usable: float = 0.9) -> int | None:
    """The fewest ``optim.micro_batches`` whose plan fits ``gpu`` (None: none does, the limit is elsewhere)."""
    rows = run.sequences_per_rank
    tried: set[int] = set()
    for m in range(1, rows + 1):
        size = -(-rows // m)
        if size in tried:
            continue
        tried.add(size)
        if plan_memory(replace(run, micro_batches=m), gpu).fits(gpu, usable):
            return m
    return None


def largest_generation_batch_size(run: RunShape, gpu: GPU, usable: float = 0.9) -> int | None:
    """The most rows ``rollout.generation_batch_size`` may sample at once with the plan fitting ``gpu``
    (HF backends; None: not even one row fits). Returns the rank's row count when no chunking is needed."""
    for size in range(run.sequences_per_rank, 0, -1):
        if plan_memory(replace(run, generation_batch_size=size), gpu).fits(gpu, usable):
            return size
    return None


ENGINE_COMPONENTS = {
    "student": ("vllm_student_engine",),
    "teacher": ("vllm_teacher_engine", "vllm_teacher_engine_scoring"),
}


def vllm_engine_room(run: RunShape, gpu: GPU, usable: float = 0.9, role: str = "student") -> float | None:
    """The most GPU share ``role``'s engine may take with the plan's peak and startup within ``usable``
    (``gpu_memory_utilization`` for the student, ``teacher_gpu_memory_utilization`` for the teacher), the other
    engine's share as ``run`` has it; None when ``run`` has no such engine.

    With sleep mode an engine's share counts only in the phases it is awake in (the student engine: sampling;
    the teacher engine: prefixes, and teacher scoring with ``teacher_scoring``), beside the rest of that phase;
    without it, always. At startup an engine needs its share free beside the models as loaded (and, without
    sleep mode, beside the engine started before it). The rest of the sampling phase depends on the step: once
    the HF teacher has written prefixes tropd empties torch's cache, so the student engine wakes beside nothing
    of torch's, while at the last steps (no prefixes) the weight sync's cached blocks are beside it. The room of
    the whole run is the smaller of step 0's (``prefix_tokens=response_tokens``) and a late step's
    (``prefix_tokens=0``). With ``release_torch_cache=False`` the HF teacher's cached prefix blocks stay beside
    the engine and grow with ``prefix_tokens``: there step 0 binds.
    """
    if role not in ENGINE_COMPONENTS:
        raise ValueError(f"role {role!r}: student or teacher")
    key = "vllm_gpu_memory_utilization" if role == "student" else "vllm_teacher_gpu_memory_utilization"
    names = ENGINE_COMPONENTS[role]

    def with_share(share: float) -> MemoryPlan:
        shares: dict[str, Any] = {key: share}
        return plan_memory(replace(run, **shares), gpu)

    phases = {c.phase for c in with_share(1.0).components if c.name in names}
    if not phases:
        return None
    base = with_share(0.0)
    limit = usable * gpu.memory_bytes
    if "persistent" in phases:
        rooms = [limit - base.peak]
    else:
        rooms = [limit - base.persistent - base.phase_total(p) for p in phases]
    rooms.append(limit - base.get("models_loaded") - (0 if run.vllm_sleep else base.get("engine_start")))
    return min(rooms) / gpu.memory_bytes
