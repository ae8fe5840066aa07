"""Multi-process training: process groups from ``torchrun``/``accelerate launch``, FSDP2 sharding, reductions.

One process per GPU (or per CPU rank with gloo, as in the tests). Nothing here runs in a plain
``tropd train``: :func:`init_from_env` returns a single-rank :class:`Dist` whose reductions are no-ops.

What is sharded and what is not (docs/scaling.md):
- the student's fp32 weights, gradients and AdamW states: FSDP2 (``fully_shard``) per decoder layer,
  plus the root (embeddings, final norm, lm_head) owned by :class:`tropd_cli.train.scoring.StudentScorer`;
- the student's sampling copy: a full, unsharded copy on every rank (bf16 where fast), re-synced from
  the shards before every rollout (:func:`full_tensor` per parameter);
- the teacher: replicated (default) or sharded the same way with ``distributed.shard_teacher=true``.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from tropd_cli.device import resolve_device
from tropd_cli.errors import UserError


@dataclass(frozen=True)
class Dist:
    """This process's place in the job; ``world_size == 1`` for a single-process run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE = Dist()


def export_submitit_ranks() -> None:
    """In a submitit job of several tasks (``hydra/launcher=slurm_8gpu``: one task per GPU), export the
    rank variables torchrun would (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) from submitit's job
    environment. Nothing happens outside submitit or when a launcher already set them."""
    if "RANK" in os.environ or not os.environ.get("SUBMITIT_EXECUTOR"):
        return
    import submitit
    from submitit.helpers import TorchDistributedEnvironment

    if submitit.JobEnvironment().num_tasks > 1:
        TorchDistributedEnvironment().export(set_cuda_visible_devices=False)  # we pick cuda:LOCAL_RANK ourselves


def env_world() -> Dist:
    """The rank layout ``torchrun`` / ``accelerate launch`` / SLURM-via-torchrun export (no process group yet)."""
    export_submitit_ranks()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return SINGLE
    return Dist(rank=int(os.environ["RANK"]), world_size=world, local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def init_from_env(device: str, timeout_minutes: int = 60) -> tuple[Dist, torch.device]:
    """Join the process group the launcher set up; returns this rank and its device.

    CUDA ranks use NCCL on ``cuda:LOCAL_RANK``; CPU ranks use gloo. Single-process runs return
    :data:`SINGLE` and the device ``device`` names (``auto``: CUDA when visible).
    """
    info = env_world()
    if not info.enabled:
        return info, resolve_device(device)
    import torch.distributed as dist

    use_cuda = device in ("auto", "cuda") and torch.cuda.is_available() or device.startswith("cuda:")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device={device} but no CUDA GPU is visible; use device=cpu or device=auto")
    if use_cuda:
        if info.local_rank >= torch.cuda.device_count():
            raise UserError(
                f"LOCAL_RANK={info.local_rank} but only {torch.cuda.device_count()} GPUs are visible; "
                "launch at most one process per GPU (torchrun --nproc_per_node)"
            )
        dev = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        kwargs: dict[str, Any] = {"device_id": dev} if use_cuda else {}
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo", timeout=datetime.timedelta(minutes=timeout_minutes), **kwargs
        )
    if dist.get_world_size() != info.world_size or dist.get_rank() != info.rank:  # pragma: no cover
        raise UserError("the process group does not match WORLD_SIZE/RANK; launch with torchrun")
    return info, dev


def require_even_split(batch_size: int, info: Dist) -> None:
    """Every rank takes the same share of a step's prompts: ``rollout.batch_size`` must split evenly."""
    if batch_size % info.world_size:
        raise UserError(
            f"rollout.batch_size={batch_size} prompts do not split evenly over {info.world_size} "
            f"ranks; use a multiple of {info.world_size}"
        )


def shutdown(info: Dist) -> None:
    if info.enabled:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# Collectives (no-ops on a single rank)


def _device_for_collectives() -> torch.device:
    import torch.distributed as dist

    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce(values: list[float], info: Dist, op: str = "sum") -> list[float]:
    """Sum (or max) a list of floats over all ranks, in fp64; every rank gets the result."""
    if not info.enabled or not values:
        return list(values)
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=_device_for_collectives())
    dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return [float(v) for v in t.cpu()]


def broadcast_object(obj: Any, info: Dist, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (paths, resume decisions)."""
    if not info.enabled:
        return obj
    import torch.distributed as dist

    box = [obj if info.rank == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_object(obj: Any, info: Dist) -> list[Any]:
    """Every rank's ``obj`` (a list indexed by rank) on every rank."""
    if not info.enabled:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(info: Dist) -> None:
    if info.enabled:
        import torch.distributed as dist

        dist.barrier()


def any_rank(flag: bool, info: Dist) -> bool:
    """True on every rank when ``flag`` is true on at least one (e.g. a stop request)."""
    return bool(all_reduce([1.0 if flag else 0.0], info, op="max")[0])


# ---------------------------------------------------------------------------------------------
# FSDP2


def full_tensor(t: Tensor) -> Tensor:
    """The whole tensor behind a (possibly sharded) parameter; collective for a DTensor."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def to_local(t: Tensor) -> Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    layers = getattr(model.get_decoder(), "layers", None)  # type: ignore[operator]
    if layers is None:
        raise UserError(f"{type(model).__name__}: no decoder .layers to shard; FSDP needs a decoder-only LM")
    return list(layers)


def shard(root: nn.Module, model: nn.Module, *, bf16: bool, reshard_after_forward: bool, trainable: bool) -> None:
    """``fully_shard`` each decoder layer of ``model``, then ``root`` (which owns the remaining parameters:
    embeddings, final norm, lm_head; tied weights stay in that one group).

    ``bf16``: unsharded parameters (compute) in bf16, gradients reduced in fp32, master weights stay in
    their load dtype: FSDP2's MixedPrecisionPolicy, the multi-GPU form of autocast.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
    kwargs: dict[str, Any] = {"reshard_after_forward": reshard_after_forward}
    if policy is not None and trainable:
        kwargs["mp_policy"] = policy
    for layer in decoder_layers(model):
        fully_shard(layer, **kwargs)
    fully_shard(root, **kwargs)


def register_forward_method(root: nn.Module, name: str) -> None:
    """Let ``root.<name>(...)`` gather the root's shards like ``forward`` does (sampling through a sharded model)."""
    from torch.distributed.fsdp import register_fsdp_forward_method

    register_fsdp_forward_method(root, name)


def full_state_dict(model: nn.Module, info: Dist) -> dict[str, Tensor]:
    """The whole model's weights on CPU (collective), for a consolidated Hugging Face checkpoint."""
    if not info.enabled:
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    weights: dict[str, Any] = get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    # Tied parameters (lm_head = embeddings) come out under every name; a checkpoint stores the first only.
    seen: set[int] = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            weights.pop(name, None)
        seen.add(id(param))
    return weights


def sharded_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Model and optimizer state as DTensor shards, for ``torch.distributed.checkpoint`` (resharding on load)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    return {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer)}


def save_sharded(path: str, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    import torch.distributed.checkpoint as dcp

    dcp.save(sharded_state(model, optimizer), checkpoint_id=path)


def load_sharded(path: str, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load shards saved by :func:`save_sharded`, by any number of ranks, into this run's layout."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    state = sharded_state(model, optimizer)
    dcp.load(state, checkpoint_id=path)
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optimizer"])
