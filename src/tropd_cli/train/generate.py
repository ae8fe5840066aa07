"""A step's batch: its prompts (a pure function of seed and step), then the student's rollouts with the
teacher's guidance prefixes, or (SFT) the targets the dataset or the teacher gives."""

from __future__ import annotations

import torch
from torch import Tensor

from tropd_cli.batch import RolloutBatch
from tropd_cli.data import sft_target
from tropd_cli.errors import UserError
from tropd_cli.rng import generator, seeded
from tropd_cli.rollout.sampling import prefix_cap, rollout, tokenize_prompts
from tropd_cli.train.setup import Run


def make_batch(run: Run, step: int) -> RolloutBatch:
    """This rank's prompts of ``step``, and what is trained on for them."""
    cfg, dist, samplers = run.cfg, run.dist, run.samplers
    index = run.order.batch(step)
    per_rank = len(index) // dist.world_size
    index = index[dist.rank * per_rank : (dist.rank + 1) * per_rank]  # this rank's prompts
    n = cfg.rollout.n_samples_per_prompt
    texts = [run.prompts[i] for i in index for _ in range(n)]
    prompt_index = torch.tensor([i for i in index for _ in range(n)], device=run.device)
    prompt_ids, prompt_mask = tokenize_prompts(
        run.tokenizer, texts, max_prompt_tokens=cfg.dataset.max_prompt_tokens, device=run.device
    )
    if not run.method.on_policy:
        return sft_batch(run, step, prompt_ids, prompt_mask, prompt_index)
    guided = None
    prefix_max = 0
    if cfg.guidance.enabled:
        # Steps run 0..S-1: anneal over S-1 so that the cap reaches 0 at the last step.
        prefix_max = prefix_cap(step, cfg.steps - 1, cfg.rollout.max_new_tokens, cfg.guidance.schedule)
        # One draw for the whole (global) batch, sliced per rank: the same rows are guided at any world size.
        draw = torch.rand(len(texts) * dist.world_size, generator=generator(cfg.seed, step, 3))
        draw = draw[dist.rank * len(texts) : (dist.rank + 1) * len(texts)]
        guided = (draw < cfg.guidance.fraction).to(run.device)
    samplers.before_rollout()
    samplers.sync(run.student.model)
    batch = rollout(
        samplers.student,
        samplers.teacher,
        run.tokenizer,
        prompt_ids,
        prompt_mask,
        prompt_index=prompt_index,
        max_new_tokens=cfg.rollout.max_new_tokens,
        min_new_tokens=cfg.rollout.min_new_tokens,
        temperature=cfg.rollout.temperature,
        top_p=cfg.rollout.top_p,
        seed=seeded(cfg.seed, step, *run.rank_keys()),
        prefix_max=prefix_max,
        prefix_sampling=cfg.guidance.prefix_sampling,
        guided_rows=guided,
        backend=samplers.backend,
        teacher_backend=samplers.teacher_backend,
        chunk_rows=cfg.rollout.generation_batch_size,
        after_prefixes=samplers.after_prefixes(),
        sampler_logp_temperature=run.scoring_temperature if run.sampler_logp else None,
    )
    samplers.after_rollout()
    return batch


def sft_batch(run: Run, step: int, prompt_ids: Tensor, prompt_mask: Tensor, prompt_index: Tensor) -> RolloutBatch:
    """SFT targets: the dataset's answers, or responses the teacher writes."""
    cfg, samplers = run.cfg, run.samplers
    if cfg.method.sft_source == "teacher":
        backend = samplers.teacher_backend or ("loop" if samplers.backend == "vllm" else samplers.backend)
        batch = rollout(
            samplers.teacher,
            None,
            run.tokenizer,
            prompt_ids,
            prompt_mask,
            prompt_index=prompt_index,
            max_new_tokens=cfg.rollout.max_new_tokens,
            min_new_tokens=0,
            temperature=cfg.rollout.temperature,
            top_p=cfg.rollout.top_p,
            seed=seeded(cfg.seed, step, *run.rank_keys()),
            backend=backend,
            chunk_rows=cfg.rollout.generation_batch_size,
        )
        samplers.after_teacher_writes()
        return batch
    eos = run.tokenizer.eos_token or ""
    answers = [sft_target(run.examples[int(i)], cfg.dataset.target_field) for i in prompt_index.tolist()]
    if any(a is None for a in answers):
        raise UserError(
            "method=sft with sft_source=dataset needs dataset answers; set dataset.answer_field "
            "(or dataset.target_field) or method.sft_source=teacher"
        )
    enc = run.tokenizer(
        [f"{a}{eos}" for a in answers],
        add_special_tokens=False,
        truncation=True,
        max_length=cfg.rollout.max_new_tokens,
        padding=True,
        return_tensors="pt",
        padding_side="right",
    )
    response_ids = enc["input_ids"].to(run.device)
    response_mask = enc["attention_mask"].to(run.device).bool()
    return RolloutBatch(
        input_ids=torch.cat([prompt_ids, response_ids], dim=1),
        attention_mask=torch.cat([prompt_mask, response_mask.long()], dim=1),
        prompt_len=prompt_ids.shape[1],
        response_mask=response_mask,
        prefix_mask=torch.zeros_like(response_mask),
        prompt_index=prompt_index,
    )
