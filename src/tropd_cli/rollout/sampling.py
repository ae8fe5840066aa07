"""Student rollouts with HF ``generate`` (KV cache, batched, seeded) and off-policy guidance prefixes."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, cast

import torch
from torch import Tensor
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from tropd_cli.batch import RolloutBatch, completion_mask
from tropd_cli.rng import generator, seeded
from tropd_cli.rollout.vllm import VLLMEngine, sample_with_engine


def tokenize_prompts(
    tokenizer: PreTrainedTokenizerBase, texts: list[str], *, max_prompt_tokens: int, device: torch.device
) -> tuple[Tensor, Tensor]:
    """Left-padded prompt ids and attention mask (left padding so generation appends in place)."""
    tokenizer.padding_side = "left"
    tokenizer.truncation_side = "left"  # an over-long prompt loses its start, never the assistant header
    enc = tokenizer(
        texts,
        return_tensors="pt",
        padding=True,
        truncation=True,
        max_length=max_prompt_tokens,
        add_special_tokens=False,  # the chat template already wrote them
    )
    return enc["input_ids"].to(device), enc["attention_mask"].to(device)


def _top_p_filter(probs: Tensor, top_p: float) -> Tensor:
    """Zero the tail outside the smallest set of tokens whose mass reaches ``top_p`` (nucleus sampling)."""
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
    outside = sorted_probs.cumsum(-1) - sorted_probs >= top_p
    sorted_probs = sorted_probs.masked_fill(outside, 0.0)
    return torch.zeros_like(probs).scatter(-1, order, sorted_probs)


@torch.no_grad()
def _sample_loop(
    model: PreTrainedModel,
    input_ids: Tensor,
    attention_mask: Tensor,
    *,
    max_new_tokens: int,
    min_new_tokens: int,
    temperature: float,
    top_p: float,
    eos_ids: Tensor,
    pad_token_id: int,
    generator: torch.Generator,
    stop_check: Callable[[Tensor], Tensor] | None = None,
    check_every: int = 8,
    row_limits: Tensor | None = None,
    logp_out: list[Tensor] | None = None,
    logp_temperature: float = 1.0,
) -> Tensor:
    """Autoregressive sampling with a KV cache and nothing else: one model call per token.

    HF ``generate`` does the same work with a general-purpose processor pipeline around it; on a CPU
    that overhead is a measurable share of a small model's step. Noise comes from ``generator``.
    ``row_limits`` ``[B]``: each row's own token budget (at most ``max_new_tokens``); the loop ends when
    every row has ended, instead of running every row to the longest budget.
    ``stop_check(tokens [B, t]) -> [B] bool``, asked every ``check_every`` tokens, ends rows early (as
    if they had written EOS: padding follows), e.g. once a stop string appears.
    """
    from transformers import DynamicCache

    batch = input_ids.shape[0]
    cache = DynamicCache()
    position_ids = (attention_mask.cumsum(-1) - 1).clamp_min(0)
    # Logits at the last position only. As an index tensor, not ``logits_to_keep=1``: HF then applies the LM head
    # to the strided slice ``hidden[:, -1:]``, and torch's bf16 ``linear`` on a non-contiguous 3-D input on the
    # CPU expands the [V, H] weight once per row (a [B, H, V] copy: 10 s at B = 100 with SmolLM2's 49k
    # vocabulary, half of a 200-problem eval). Indexing gathers a contiguous [B, 1, H] first.
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=torch.tensor([input_ids.shape[1] - 1], device=input_ids.device),
    )
    finished = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
    tokens, logps = [], []
    for t in range(max_new_tokens):
        logits = out.logits[:, -1].float()
        raw = logits.clone() if logp_out is not None else None
        if t < min_new_tokens:
            logits[:, eos_ids] = -math.inf
        if temperature > 0:
            probs = torch.softmax(logits / temperature, dim=-1)
            if top_p < 1.0:
                probs = _top_p_filter(probs, top_p)
            next_token = torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(1).to(input_ids.device)
        else:
            next_token = logits.argmax(-1)
        if raw is not None:
            lp = torch.log_softmax(raw / logp_temperature, dim=-1).gather(-1, next_token[:, None]).squeeze(1)
            logps.append(torch.where(finished, 0.0, lp))
        next_token = torch.where(finished, pad_token_id, next_token)
        tokens.append(next_token)
        finished |= torch.isin(next_token, eos_ids)
        if row_limits is not None:
            finished |= t + 1 >= row_limits  # a row that reached its own budget pads from here on
        if stop_check is not None and (t + 1) % check_every == 0:
            finished |= stop_check(torch.stack(tokens, dim=1)).to(finished.device)
        if bool(finished.all()) or t == max_new_tokens - 1:
            break
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(batch, 1)], dim=1)
        position_ids = position_ids[:, -1:] + 1
        out = model(
            input_ids=next_token[:, None],
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
        )
    if logp_out is not None:
        logp_out.append(torch.stack(logps, dim=1) if logps else torch.zeros(batch, 0, device=input_ids.device))
    if not tokens:
        return input_ids.new_empty(batch, 0)
    return torch.stack(tokens, dim=1)


@torch.no_grad()
def sample(
    model: PreTrainedModel | VLLMEngine,
    input_ids: Tensor,
    attention_mask: Tensor,
    *,
    max_new_tokens: int,
    min_new_tokens: int = 0,
    temperature: float = 1.0,
    top_p: float = 1.0,
    eos_token_id: int | list[int] | None,
    pad_token_id: int,
    seed: int,
    backend: str = "loop",
    stop_check: Callable[[Tensor], Tensor] | None = None,
    row_limits: Tensor | None = None,
    chunk_rows: int = 0,
    logp_out: list[Tensor] | None = None,
    logp_temperature: float = 1.0,
) -> Tensor:
    """Sample continuations ``[B, T']`` (padded with ``pad_token_id`` after EOS) from ``model``.

    Sampling is from the full distribution at ``temperature`` (no top-k, and top-p only when asked),
    so that rollout log-probs match the trainer's scoring. ``temperature <= 0`` means greedy.
    ``backend``: ``loop`` (a minimal KV-cache loop, the default), ``generate`` (HF ``generate``) or
    ``vllm`` (``model`` is then a :class:`tropd_cli.rollout.vllm.VLLMEngine`; same layout, same
    distribution, vLLM's own per-row seeded noise).
    ``stop_check``: see :func:`_sample_loop` (``loop`` only). ``row_limits``: each row's own budget
    (``loop``; ``vllm``: each request's ``max_tokens``; ``generate`` runs to ``max_new_tokens`` and the
    caller cuts the rows). ``chunk_rows > 0`` (HF backends): sample at most that many rows at a time, rows of
    similar length together, each chunk without the padding columns it does not need; this bounds the
    KV cache at ``chunk_rows x (longest context + max_new_tokens)``. Chunk ``c`` draws its noise from
    ``seeded(seed, 7, c)``, so the samples differ from the unchunked ones (same distribution).

    ``logp_out``: when given, receives the sampler's own log-probs of the tokens it wrote (``[B, T']``, at
    ``logp_temperature``, 0 on padding; see :func:`_sample_loop`): what ``rollout.is_correction`` weighs by.
    """
    if chunk_rows > 0 and input_ids.shape[0] > chunk_rows and backend not in ("vllm", "server"):
        return _sample_in_chunks(
            model,
            input_ids,
            attention_mask,
            chunk_rows=chunk_rows,
            row_limits=row_limits,
            max_new_tokens=max_new_tokens,
            min_new_tokens=min_new_tokens,
            temperature=temperature,
            top_p=top_p,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            seed=seed,
            backend=backend,
            stop_check=stop_check,
            logp_out=logp_out,
            logp_temperature=logp_temperature,
        )
    if backend in ("vllm", "server"):  # an engine: a vLLM engine, or a served teacher (same interface)
        if isinstance(model, torch.nn.Module):
            raise TypeError("backend='vllm' samples from a VLLMEngine, not a torch module; use loop or generate")
        return sample_with_engine(
            model,
            input_ids,
            attention_mask,
            max_new_tokens=max_new_tokens,
            min_new_tokens=min(min_new_tokens, max_new_tokens),
            temperature=temperature,
            top_p=top_p,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            seed=seed,
            row_limits=row_limits,
            logp_out=logp_out,
            logp_temperature=logp_temperature,
        )
    model = cast(PreTrainedModel, model)
    eos = [] if eos_token_id is None else eos_token_id if isinstance(eos_token_id, list) else [eos_token_id]
    was_training = model.training
    model.eval()
    try:
        if backend == "loop":
            return _sample_loop(
                model,
                input_ids,
                attention_mask,
                max_new_tokens=max_new_tokens,
                min_new_tokens=min(min_new_tokens, max_new_tokens),
                temperature=temperature,
                top_p=top_p,
                eos_ids=torch.tensor(eos, dtype=torch.long, device=input_ids.device),
                pad_token_id=pad_token_id,
                generator=generator(seed),
                stop_check=stop_check,
                row_limits=row_limits,
                logp_out=logp_out,
                logp_temperature=logp_temperature,
            )
        if backend != "generate":
            raise ValueError(f"unknown sampling backend {backend!r}; choose loop, generate or vllm")
        gen_cfg = _generation_config(max_new_tokens, min_new_tokens, temperature, top_p, eos_token_id, pad_token_id)
        with torch.random.fork_rng(devices=[input_ids.device] if input_ids.device.type == "cuda" else []):
            torch.manual_seed(seed)
            out = model.generate(  # type: ignore[operator]
                input_ids=input_ids,
                attention_mask=attention_mask,
                generation_config=gen_cfg,
                output_logits=logp_out is not None,
                return_dict_in_generate=logp_out is not None,
            )
        if logp_out is None:
            return out[:, input_ids.shape[1] :]
        tokens = out.sequences[:, input_ids.shape[1] :]
        if not out.logits:
            logp_out.append(torch.zeros(tokens.shape, device=tokens.device))
            return tokens
        raw = torch.stack(out.logits, dim=1).float()  # [B, T', V]: before any processor
        logp = torch.log_softmax(raw / logp_temperature, dim=-1).gather(-1, tokens[..., None]).squeeze(-1)
        logp_out.append(torch.where(completion_mask(tokens, eos or None), logp, 0.0))
        return tokens
    finally:
        model.train(was_training)


def _generation_config(
    max_new_tokens: int,
    min_new_tokens: int,
    temperature: float,
    top_p: float,
    eos_token_id: int | list[int] | None,
    pad_token_id: int,
) -> GenerationConfig:
    """HF ``generate``'s settings for :func:`sample`: the full distribution at ``temperature`` (no top-k)."""
    do_sample = temperature > 0
    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        min_new_tokens=min(min_new_tokens, max_new_tokens),
        do_sample=do_sample,
        temperature=temperature if do_sample else None,
        top_p=top_p if do_sample else None,
        top_k=0 if do_sample else None,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        use_cache=True,
    )


def _sample_in_chunks(
    model: Any,
    input_ids: Tensor,
    attention_mask: Tensor,
    *,
    chunk_rows: int,
    row_limits: Tensor | None,
    seed: int,
    pad_token_id: int,
    logp_out: list[Tensor] | None = None,
    **kwargs: Any,
) -> Tensor:
    """:func:`sample` over chunks of ``chunk_rows`` rows, longest contexts first, reassembled in row order."""
    order = torch.argsort(attention_mask.sum(-1), descending=True, stable=True)
    pieces: list[tuple[Tensor, Tensor, Tensor | None]] = []
    for c, start in enumerate(range(0, len(order), chunk_rows)):
        rows = order[start : start + chunk_rows]
        ids, mask = input_ids[rows], attention_mask[rows]
        first = int(mask.any(0).long().argmax())  # left padding no row of this chunk needs
        sink: list[Tensor] | None = None if logp_out is None else []
        out = sample(
            model,
            ids[:, first:],
            mask[:, first:],
            seed=seeded(seed, 7, c),
            pad_token_id=pad_token_id,
            row_limits=None if row_limits is None else row_limits[rows],
            logp_out=sink,
            **kwargs,
        )
        pieces.append((rows, out, sink[0] if sink else None))
    width = max(out.shape[1] for _, out, _ in pieces)
    result = input_ids.new_full((input_ids.shape[0], width), pad_token_id)
    logp = torch.zeros(result.shape, device=result.device)
    for rows, out, lp in pieces:
        result[rows, : out.shape[1]] = out
        if lp is not None:
            logp[rows, : lp.shape[1]] = lp
    if logp_out is not None:
        logp_out.append(logp)
    return result


def prefix_cap(step: int, steps: int, max_new_tokens: int, schedule: str = "cosine") -> int:
    """Longest teacher prefix allowed at ``step``: ``L * 0.5 * (1 + cos(pi * s / S))`` for ``cosine``."""
    if schedule == "constant":
        return max_new_tokens
    if schedule != "cosine":
        raise ValueError(f"unknown guidance schedule {schedule!r}; choose cosine or constant")
    return int(max_new_tokens * 0.5 * (1.0 + math.cos(math.pi * step / max(steps, 1))))


def _left_pad(seqs: list[Tensor], pad_id: int) -> tuple[Tensor, Tensor]:
    width = max(len(s) for s in seqs)
    ids = seqs[0].new_full((len(seqs), width), pad_id)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, width - len(s) :] = s
        mask[i, width - len(s) :] = 1
    return ids, mask


def _right_pad(seqs: list[Tensor], pad_id: float, width: int | None = None) -> Tensor:
    width = width if width is not None else max(1, max(len(s) for s in seqs))
    out = seqs[0].new_full((len(seqs), width), pad_id)
    for i, s in enumerate(seqs):
        s = s[:width]
        out[i, : len(s)] = s
    return out


def rollout(
    student: PreTrainedModel | VLLMEngine,
    teacher: PreTrainedModel | None,
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    *,
    prompt_index: Tensor,
    max_new_tokens: int,
    min_new_tokens: int,
    temperature: float,
    top_p: float,
    seed: int,
    prefix_max: int = 0,
    prefix_sampling: str = "min",
    guided_rows: Tensor | None = None,
    backend: str = "loop",
    teacher_backend: str | None = None,
    chunk_rows: int = 0,
    after_prefixes: Callable[[], None] | None = None,
    sampler_logp_temperature: float | None = None,
) -> RolloutBatch:
    """One batch of rollouts: optionally a teacher prefix per row, then the student continues.

    ``guided_rows`` (bool ``[B]``) selects the rows that get a teacher prefix of at most ``prefix_max``
    tokens; ``prefix_sampling="min"`` keeps ``min(prefix_max, len(teacher response))`` tokens,
    ``"uniform"`` draws the length from ``U[0, that]``. Randomness is keyed by ``seed``.
    With ``backend="vllm"`` the student is a :class:`tropd_cli.rollout.vllm.VLLMEngine` and the
    teacher writes its prefixes with ``teacher_backend`` (default: ``loop`` for an HF teacher; ``vllm``
    when ``teacher`` is an engine too). Each row's continuation stops at its own budget,
    ``max_new_tokens - len(prefix)``; ``chunk_rows``: see :func:`sample`. ``after_prefixes`` is called
    once the teacher has written its prefixes (e.g. to put a teacher engine to sleep before the student's).
    ``sampler_logp_temperature``: when given, the batch carries the sampler's own log-probs of the student's
    tokens at that temperature (``RolloutBatch.sampler_logp``; teacher-prefix positions hold 0).
    """
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    batch = prompt_ids.shape[0]
    sampling = dict(temperature=temperature, top_p=top_p, eos_token_id=eos, pad_token_id=pad, backend=backend)

    prefixes = [prompt_ids.new_empty(0) for _ in range(batch)]
    if teacher is not None and prefix_max > 0 and guided_rows is not None and bool(guided_rows.any()):
        if teacher_backend is None:
            teacher_backend = "loop" if backend in ("vllm", "server") else backend
        rows = guided_rows.nonzero().squeeze(1)
        written = _teacher_prefixes(
            teacher,
            prompt_ids[rows],
            prompt_mask[rows],
            prefix_max=prefix_max,
            prefix_sampling=prefix_sampling,
            seed=seed,
            chunk_rows=chunk_rows,
            **{**sampling, "backend": teacher_backend},
        )
        for row, prefix in zip(rows.tolist(), written, strict=True):
            prefixes[row] = prefix
        if after_prefixes is not None:
            after_prefixes()

    prefix_lens = [len(p) for p in prefixes]
    if max(prefix_lens) == 0:
        cont_ids, cont_mask = prompt_ids, prompt_mask
    else:
        cont_ids, cont_mask = _left_pad(
            [torch.cat([prompt_ids[i][prompt_mask[i].bool()], prefixes[i]]) for i in range(batch)], pad
        )
    budget = max_new_tokens - min(prefix_lens)
    sink: list[Tensor] | None = None if sampler_logp_temperature is None else []
    continuation = (
        sample(
            student,
            cont_ids,
            cont_mask,
            max_new_tokens=budget,
            min_new_tokens=max(0, min_new_tokens - min(prefix_lens)),
            seed=seeded(seed, 0),
            row_limits=torch.tensor([max_new_tokens - n for n in prefix_lens], device=cont_ids.device),
            chunk_rows=chunk_rows,
            logp_out=sink,
            logp_temperature=sampler_logp_temperature or 1.0,
            **sampling,
        )
        if budget > 0
        else prompt_ids.new_empty(batch, 0)
    )
    cont_logp = None
    if sink is not None:
        cont_logp = sink[0] if sink else torch.zeros(continuation.shape, device=continuation.device)
    return _assemble(prompt_ids, prompt_mask, prefixes, continuation, prompt_index, max_new_tokens, eos, pad, cont_logp)


def _teacher_prefixes(
    teacher: PreTrainedModel | VLLMEngine,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    *,
    prefix_max: int,
    prefix_sampling: str,
    seed: int,
    chunk_rows: int,
    eos_token_id: Any,
    **sampling: Any,
) -> list[Tensor]:
    """The teacher's guidance prefix for each of these rows: its response up to ``prefix_max`` tokens, without
    its EOS (the student must be able to continue), cut to ``min`` or a ``uniform`` draw of that length."""
    written = sample(
        teacher,
        prompt_ids,
        prompt_mask,
        max_new_tokens=prefix_max,
        seed=seeded(seed, 1),
        chunk_rows=chunk_rows,
        eos_token_id=eos_token_id,
        **sampling,
    )
    eos = eos_token_id
    eos_ids = torch.tensor([eos] if not isinstance(eos, list) else eos, device=written.device)
    body = completion_mask(written, eos) & ~torch.isin(written, eos_ids)
    lengths = body.sum(-1)
    if prefix_sampling == "uniform":
        draw = torch.rand(len(prompt_ids), generator=generator(seed, 2))
        lengths = torch.floor(draw * (lengths.cpu() + 1)).long().to(lengths.device)
    elif prefix_sampling != "min":
        raise ValueError(f"unknown prefix_sampling {prefix_sampling!r}; choose min or uniform")
    return [written[j, : int(lengths[j])] for j in range(len(prompt_ids))]


def _assemble(
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    prefixes: list[Tensor],
    continuation: Tensor,
    prompt_index: Tensor,
    max_new_tokens: int,
    eos: Any,
    pad: int,
    cont_logp: Tensor | None = None,
) -> RolloutBatch:
    """Prompt, then per row its prefix and continuation (cut at its own budget and first EOS), right-padded;
    ``cont_logp`` (the sampler's log-probs of ``continuation``) laid out the same way, 0 on prefixes."""
    responses, prefix_masks, valid, logps = [], [], [], []
    for i, prefix in enumerate(prefixes):
        cont = continuation[i, : max_new_tokens - len(prefix)]
        cont_valid = completion_mask(cont[None], eos)[0]
        if cont_logp is not None:
            lp = torch.where(cont_valid, cont_logp[i, : len(cont)].float(), 0.0)
            logps.append(torch.cat([torch.zeros(len(prefix), device=lp.device), lp]))
        responses.append(torch.cat([prefix, cont]))
        prefix_masks.append(torch.cat([torch.ones_like(prefix, dtype=torch.bool), torch.zeros_like(cont_valid)]))
        valid.append(torch.cat([torch.ones_like(prefix, dtype=torch.bool), cont_valid]))
    width = max(1, max(int(v.nonzero().max()) + 1 if v.any() else 0 for v in valid))
    response_mask = _right_pad(valid, False, width).bool()
    response_ids = torch.where(response_mask, _right_pad(responses, pad, width), pad)
    return RolloutBatch(
        input_ids=torch.cat([prompt_ids, response_ids], dim=1),
        attention_mask=torch.cat([prompt_mask, response_mask.long()], dim=1),
        prompt_len=prompt_ids.shape[1],
        response_mask=response_mask,
        prefix_mask=_right_pad(prefix_masks, False, width).bool() & response_mask,
        prompt_index=prompt_index,
        sampler_logp=None if cont_logp is None else _right_pad(logps, 0.0, width).float(),
    )
