"""The carriers between rollout, scoring and the loss: a batch of sequences and the teacher's statistics on it.

Leaves of the package: they import nothing of tropd. Shapes: ``B`` rows, ``P`` prompt columns (left-padded),
``T`` response columns (right-padded), ``N`` response positions flattened over the batch, ``k`` the top-k.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class RolloutBatch:
    """Sequences laid out as ``[prompt (left-padded, P) | response (right-padded, T)]``."""

    input_ids: Tensor  # [B, P + T]
    attention_mask: Tensor  # [B, P + T]
    prompt_len: int  # P
    response_mask: Tensor  # [B, T] bool: generated tokens, up to and including the first EOS
    prefix_mask: Tensor  # [B, T] bool: tokens written by the teacher (guidance prefix)
    prompt_index: Tensor  # [B] index of each row's prompt in the step's prompt list
    # [B, T] the sampler's own log-probs of the student's tokens (0 elsewhere), when the sampler is not the trained
    # module (a bf16 copy, vLLM): rollout.is_correction weighs the loss by the trainer/sampler ratio.
    sampler_logp: Tensor | None = None

    @property
    def response_ids(self) -> Tensor:
        return self.input_ids[:, self.prompt_len :]

    def rows(self, index: Tensor | slice) -> RolloutBatch:
        return RolloutBatch(
            input_ids=self.input_ids[index],
            attention_mask=self.attention_mask[index],
            prompt_len=self.prompt_len,
            response_mask=self.response_mask[index],
            prefix_mask=self.prefix_mask[index],
            prompt_index=self.prompt_index[index],
            sampler_logp=None if self.sampler_logp is None else self.sampler_logp[index],
        )


@dataclass
class TeacherScores:
    """Teacher statistics at N flattened response positions (all detached)."""

    logp: Tensor  # [N] log pi_T of the sampled token
    topk_ids: Tensor  # [N, k] the teacher's k most likely next tokens
    topk_logp: Tensor  # [N, k] their full-vocabulary log-probs
    entropy: Tensor  # [N]


def completion_mask(tokens: Tensor, eos_token_id: int | list[int] | None) -> Tensor:
    """1 on generated tokens up to and including the first EOS; 0 after it (padding)."""
    if eos_token_id is None:
        return torch.ones_like(tokens, dtype=torch.bool)
    eos_ids = torch.tensor(eos_token_id if isinstance(eos_token_id, list) else [eos_token_id], device=tokens.device)
    is_eos = torch.isin(tokens, eos_ids).long()
    ended_before = (is_eos.cumsum(-1) - is_eos) > 0
    return ~ended_before
