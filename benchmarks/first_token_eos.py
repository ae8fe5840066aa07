"""Why a distilled student starts answering with EOS: the reverse-KL gradient on the EOS logit at the first position.

For each prompt, at the first response position, with student log-probs ``s`` and teacher log-probs ``t`` over the
vocabulary, the per-position reverse KL ``KL = sum_v p_s(v) (s_v - t_v)`` has the exact logit gradient

    dKL/dz_v = p_s(v) * (s_v - t_v - KL)

so gradient descent raises token ``v`` exactly when ``t_v - s_v > -KL``: every token the teacher likes better, relative
to the student, than the student's average token. While the student's first-token distribution is far from the
teacher's (``KL`` of many nats), that holds for EOS too, however unlikely the teacher finds EOS there: the objective
itself pushes EOS up (:func:`eos_push` > 0) until the student's first-token KL falls below the EOS log-ratio. K1
samples estimate this same gradient. How far EOS then rises is a matter of the optimizer and the shared weights (Adam
normalises each parameter's step, so a consistent push counts more than its size: a hypothesis this does not test).

This prints, for the untrained student (and a checkpoint, if given): mean p_s(EOS) and p_t(EOS) at the first
position, the first-token KL, the share of prompts where descent raises EOS, and the mean push.

Usage::

    python benchmarks/first_token_eos.py                                  # the default pair, untrained
    python benchmarks/first_token_eos.py --checkpoint outputs/train/DATE/TIME/checkpoint
    python benchmarks/first_token_eos.py experiment=smol_lab --prompts 64
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import Tensor


def eos_push(student_logp: Tensor, teacher_logp: Tensor, eos: int) -> tuple[Tensor, Tensor]:
    """Per row: minus the reverse-KL gradient on the EOS logit (> 0: descent raises EOS), and the row's KL.

    ``student_logp``, ``teacher_logp``: ``[N, V]`` log-probabilities at one position.
    """
    p = student_logp.exp()
    kl = (p * (student_logp - teacher_logp)).sum(-1)
    return p[:, eos] * (teacher_logp[:, eos] - student_logp[:, eos] + kl), kl


@torch.no_grad()
def first_position(model: torch.nn.Module, enc: dict[str, Tensor]) -> Tensor:
    """Log-probabilities of the first response token, ``[N, V]`` (prompts left-padded)."""
    model.eval()
    return torch.log_softmax(model(**enc).logits[:, -1].float(), -1)


def measure(overrides: list[str], checkpoint: str | None, prompts: int) -> list[dict[str, float | str]]:
    from hydra import compose, initialize_config_dir

    from tropd_cli.commands.common import CONF_DIR, to_object
    from tropd_cli.config import ModelConfig, TrainConfig
    from tropd_cli.data import dataset_prompts, examples_from_config
    from tropd_cli.models import default_cache_dir, load_model, load_pair

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = to_object(compose("train", [*overrides, "logger=none"]), TrainConfig)
    cpu, cache = torch.device("cpu"), default_cache_dir(cfg.cache_dir)
    teacher, student = load_pair(cfg.teacher, cfg.student, device=cpu, cache_dir=cache)
    tok = teacher.tokenizer
    eos = tok.eos_token_id
    examples = examples_from_config(cfg.dataset)[:prompts]
    enc = dict(
        tok(
            dataset_prompts(tok, examples, cfg.dataset),
            return_tensors="pt",
            padding=True,
            padding_side="left",
            add_special_tokens=False,
        )
    )
    t = first_position(teacher.model, enc)
    models = {"untrained student": student.model}
    if checkpoint:
        models[checkpoint] = load_model(ModelConfig(name=checkpoint), device=cpu, cache_dir=cache, frozen=True).model
    rows: list[dict[str, float | str]] = []
    for name, model in models.items():
        s = first_position(model, enc)
        push, kl = eos_push(s, t, eos)
        rows.append(
            {
                "model": name,
                "p_student_eos": s[:, eos].exp().mean().item(),
                "p_teacher_eos": t[:, eos].exp().mean().item(),
                "first_token_kl": kl.mean().item(),
                "share_raised": (push > 0).float().mean().item(),
                "mean_push": push.mean().item(),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--checkpoint", default=None, help="a trained student to compare with the untrained one")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--out-json", type=Path, default=None)
    parser.add_argument("overrides", nargs="*", help="tropd train overrides (the pair and the prompts)")
    args = parser.parse_intermixed_args(argv)
    rows = measure(args.overrides, args.checkpoint, args.prompts)
    print("| model | p_s(EOS) first token | p_t(EOS) | first-token KL | prompts where descent raises EOS | mean push |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['p_student_eos']:.2e} | {r['p_teacher_eos']:.2e} | {r['first_token_kl']:.2f} "
            f"| {100 * float(r['share_raised']):.0f}% | {float(r['mean_push']):+.2e} |"
        )
    if args.out_json:
        args.out_json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
