"""``teacher.backend=server``: the teacher's log-probs and text from an OpenAI-compatible vLLM server.

:class:`TeacherServer` has the two methods the trainer asks of a teacher engine
(:class:`tropd_cli.rollout.vllm.VLLMEngine`'s interface): ``teacher_scores`` (top-k prompt log-probs of the
rollouts, vLLM's ``prompt_logprobs``) and ``generate`` (guidance prefixes, SFT targets, seeded per row). Requests go
out batched (``sequences_per_request``) and concurrently (``concurrency``), each with a timeout and retries; a
server that is gone is one line naming the URL.

Before the first step :meth:`TeacherServer.check` refuses, each with one line, a server whose tokenizer or
vocabulary differs from the student's, that cannot return ``top_k`` log-probs, that returns processed
(temperature-scaled) instead of raw log-probs, or that scores one fixed sequence differently twice.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import random
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from tropd_cli.batch import TeacherScores
from tropd_cli.config import ServerConfig
from tropd_cli.errors import UserError
from tropd_cli.rollout.vllm import request_sampling_kwargs, row_budgets, teacher_scores_from_vllm

log = logging.getLogger(__name__)

#: Texts whose tokenization the server and the student must agree on (chat markup, digits, spaces, non-ASCII).
PROBE_TEXTS = (
    "Calculate 4 + 7 - 7 step by step.",
    "  Spaces,\ttabs\nand newlines; 0123456789 = 12 * 34 / 5.6",
    "Ünïcödé: naïve café, 東京, emoji 🙂 and a long-wordlikethisonethatsplits.",
)


class ServerError(UserError):
    """The server refused a request, or could not be reached after every retry."""


class TeacherServer:
    """A served teacher: scoring and sampling through HTTP (see the module docstring)."""

    def __init__(self, cfg: ServerConfig, *, vocab: int) -> None:
        self.cfg, self.vocab = cfg, vocab
        self.url = cfg.url.rstrip("/")
        self.model: str | None = cfg.model
        self.max_logprobs = 0  # what check() confirmed the server returns
        key = os.environ.get(cfg.api_key_env) if cfg.api_key_env else None
        self.headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
        self.pool = ThreadPoolExecutor(max_workers=max(1, cfg.concurrency), thread_name_prefix="teacher-server")
        # Direct connections: an http_proxy set for the internet must not carry loopback or cluster traffic.
        self.opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    # -- transport ----------------------------------------------------------------------------
    def _request(self, path: str, body: dict[str, Any] | None = None) -> Any:
        """One JSON request with ``retries`` more tries (timeouts, refused or broken connections, 408, 429, 5xx,
        an answer that is not JSON; backoff 0.5 s, 1 s, 2 s, ...); any other 4xx is the server's answer and fails
        at once."""
        data = None if body is None else json.dumps(body).encode()
        last = ""
        for attempt in range(self.cfg.retries + 1):
            if attempt:
                time.sleep(min(0.5 * 2 ** (attempt - 1), 8.0) * (1 + 0.1 * random.random()))
            req = urllib.request.Request(self.url + path, data=data, headers=self.headers)
            try:
                with self.opener.open(req, timeout=self.cfg.timeout_s) as resp:
                    return json.loads(resp.read())
            except urllib.error.HTTPError as err:
                message = _error_message(err)
                err.close()
                if err.code < 500 and err.code not in (408, 429):
                    raise ServerError(
                        f"the teacher server at {self.url} refused {path} ({err.code}): {message}"
                    ) from None
                last = f"{err.code}: {message}"
            except (http.client.HTTPException, ValueError) as err:  # a broken response, or one that is not JSON
                last = f"a broken answer ({type(err).__name__})"
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as err:
                reason = getattr(err, "reason", err)
                last = "timed out" if isinstance(reason, TimeoutError) or "timed out" in str(reason) else str(reason)
            log.debug("teacher server %s%s: %s (try %d)", self.url, path, last, attempt + 1)
        raise ServerError(
            f"the teacher server at {self.url} did not answer {path} after {self.cfg.retries + 1} tries ({last}); "
            "start it or fix teacher.server.url (docs/teacher-server.md), then resume with resume=auto"
        )

    def _completions(self, body: dict[str, Any]) -> list[dict[str, Any]]:
        out = self._request("/v1/completions", {"model": self.model, **body})
        choices = sorted(out.get("choices") or [], key=lambda c: c.get("index", 0))
        return choices

    # -- start-up -----------------------------------------------------------------------------
    def check(self, tokenizer: Any, *, top_k: int, self_test: bool = True) -> None:
        """Refuse (one line each) a server this run cannot train against: see the module docstring.

        ``self_test``: also score the probe a second time and require the same answer. Under ``torchrun`` only
        rank 0 does (every rank's probes at once would share vLLM batches, whose numbers depend on the batch)."""
        models = [m.get("id") for m in (self._request("/v1/models").get("data") or [])]
        if self.model is None:
            if len(models) != 1:
                raise UserError(
                    f"the teacher server at {self.url} serves {len(models)} models ({', '.join(map(str, models))}); "
                    "name one with teacher.server.model"
                )
            self.model = models[0]
        elif self.model not in models:
            raise UserError(
                f"the teacher server at {self.url} does not serve {self.model!r} (it serves: "
                f"{', '.join(map(str, models))}); fix teacher.server.model"
            )
        for text in PROBE_TEXTS:
            theirs = self._request("/tokenize", {"model": self.model, "prompt": text, "add_special_tokens": False})
            ours = tokenizer(text, add_special_tokens=False)["input_ids"]
            if list(theirs.get("tokens") or []) != list(ours):
                raise UserError(
                    f"the teacher server's tokenizer differs from the student's ({text[:24]!r}... is "
                    f"{len(theirs.get('tokens') or [])} tokens there, {len(ours)} here); serve a teacher of the "
                    "student's tokenizer"
                )
        # The vocabulary: 64 ids spread over the tokenizer's (the last included), one /detokenize each; lm_head rows
        # beyond the tokenizer (padding) are no token either side can name.
        known = min(self.vocab, len(tokenizer))
        ids = sorted({round(i * (known - 1) / 63) for i in range(64)})
        answers = self.pool.map(lambda t: self._request("/detokenize", {"model": self.model, "tokens": [t]}), ids)
        for token, answer in zip(ids, answers, strict=True):
            if answer.get("prompt") != tokenizer.decode([token]):
                raise UserError(
                    f"the teacher server's vocabulary differs from the student's (token {token} is "
                    f"{answer.get('prompt')!r} there, {tokenizer.decode([token])!r} here); serve a teacher of the "
                    "student's vocabulary"
                )
        probe = tokenizer(PROBE_TEXTS[0] + " " + PROBE_TEXTS[1], add_special_tokens=False)["input_ids"]
        first = self._probe_logprobs(probe, top_k, temperature=1.0)
        if any(len(entries) < min(top_k, self.vocab) for entries in first):
            got = min(len(e) for e in first)
            raise UserError(
                f"the teacher server returned {got} log-probs per position, the run needs method.top_k={top_k}; "
                f"start it with --max-logprobs {top_k} or lower method.top_k"
            )
        hot = self._probe_logprobs(probe, top_k, temperature=0.5)
        if hot != first and not _close(hot, first):
            raise UserError(
                "the teacher server returns processed log-probs (the request's temperature changes them); tropd needs "
                "raw log-probs: start vLLM with --logprobs-mode raw_logprobs (its default)"
            )
        again = self._probe_logprobs(probe, top_k, temperature=1.0) if self_test else first
        if again != first:
            worst = _largest_difference(first, again)
            raise UserError(
                f"the teacher server scored one fixed sequence twice with different log-probs (up to {worst:.2e} "
                "apart); make it deterministic (vLLM: one model replica per URL, no speculative decoding)"
            )
        self.max_logprobs = top_k
        log.info(
            "teacher server %s (%s): tokenizer, vocabulary, raw log-probs and determinism checked", self.url, self.model
        )

    def _probe_logprobs(self, ids: list[int], top_k: int, *, temperature: float) -> list[dict[int, float]]:
        try:
            (choice,) = self._completions(
                {"prompt": [ids], "max_tokens": 1, "temperature": temperature, "prompt_logprobs": top_k, "seed": 0}
            )
        except ServerError as err:
            if "logprobs" in str(err):
                raise UserError(
                    f"the teacher server cannot return method.top_k={top_k} log-probs ({str(err).split(': ', 1)[-1]}); "
                    f"start it with --max-logprobs {top_k} or lower method.top_k"
                ) from None
            raise
        return _positions(choice, first=1)

    # -- what the trainer asks ------------------------------------------------------------------
    def prompt_logprobs(
        self, sequences: list[list[int]], start: Sequence[int], top_k: int
    ) -> list[list[dict[int, float]]]:
        """:meth:`VLLMEngine.prompt_logprobs` through the server: ``sequences_per_request`` per request, concurrently."""
        if any(s < 1 for s in start):
            raise ValueError("start must be >= 1: the first token of a sequence has no log-prob")
        n = max(1, self.cfg.sequences_per_request)
        groups = [list(range(i, min(i + n, len(sequences)))) for i in range(0, len(sequences), n)]

        def score(rows: list[int]) -> list[list[dict[int, float]]]:
            choices = self._completions(
                {"prompt": [sequences[r] for r in rows], "max_tokens": 1, "temperature": 1.0, "prompt_logprobs": top_k}
            )
            if len(choices) != len(rows):
                raise ServerError(f"the teacher server at {self.url} answered {len(choices)} of {len(rows)} prompts")
            return [_positions(c, first=start[r]) for c, r in zip(choices, rows, strict=True)]

        result: list[list[dict[int, float]]] = []
        for part in self.pool.map(score, groups):
            result.extend(part)
        for row in result:
            for entries in row:
                if any(t >= self.vocab for t in entries):
                    raise UserError(
                        f"the teacher server returned token ids beyond the student's vocabulary ({self.vocab}); "
                        "serve a teacher of the student's vocabulary"
                    )
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
        """:class:`TeacherScores` at positions ``start[i]..`` (the entropy is a lower bound from the top-k, as with
        a vLLM engine; temperature 1 only: prompt log-probs are raw)."""
        if temperature != 1.0:
            raise UserError(f"a served teacher scores at temperature 1 only (asked {temperature})")
        positions = self.prompt_logprobs(sequences, start, top_k)
        targets = [seq[first:] for seq, first in zip(sequences, start, strict=True)]
        return teacher_scores_from_vllm(positions, targets, top_k=top_k, device=device)

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
        """:meth:`VLLMEngine.generate` through the server: one request per row (its own budget and seed
        ``seeded(seed, row)``), concurrently; stopping is tropd's (``ignore_eos`` and ``stop_token_ids``)."""
        if logprobs_out is not None:
            raise ValueError("a served teacher writes text; it is never the student's sampler")
        budgets = row_budgets(max_new_tokens, len(prompt_token_ids))
        # The same per-row sampling settings a colocated engine gets (detokenize is an engine option, not an API one).
        params = request_sampling_kwargs(
            len(prompt_token_ids),
            max_new_tokens=budgets,
            min_new_tokens=min_new_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            stop_token_ids=stop_token_ids,
        )

        def write(row: int) -> list[int]:
            if budgets[row] <= 0:
                return []
            body = {k: v for k, v in params[row].items() if k != "detokenize"}
            (choice,) = self._completions(
                {"prompt": [list(map(int, prompt_token_ids[row]))], **body, "return_token_ids": True}
            )
            ids = choice.get("token_ids")
            if ids is None:
                raise UserError(
                    f"the teacher server at {self.url} returns no token ids (return_token_ids); tropd needs vLLM >= "
                    "0.10.2 (or this package's tropd_cli.serving.hf_server)"
                )
            return [int(t) for t in ids]

        return list(self.pool.map(write, range(len(prompt_token_ids))))

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


def _error_message(err: urllib.error.HTTPError) -> str:
    try:
        body = json.loads(err.read() or b"{}")
    except (ValueError, OSError):
        return err.reason if isinstance(err.reason, str) else str(err)
    error = body.get("error", body) if isinstance(body, dict) else body
    message = error.get("message", error) if isinstance(error, dict) else error
    return " ".join(str(message).split())[:300]


def _positions(choice: dict[str, Any], *, first: int) -> list[dict[int, float]]:
    """A choice's prompt log-probs from position ``first`` on, as ``{token_id: logprob}`` per position."""
    positions = choice.get("prompt_logprobs")
    if positions is None:
        raise UserError("the teacher server returned no prompt_logprobs; tropd needs vLLM's OpenAI server (>= 0.6)")
    out = []
    for entries in positions[first:]:
        if entries is None:
            raise UserError("the teacher server returned no log-probs at a scored position")
        out.append({int(t): float(v["logprob"] if isinstance(v, dict) else v) for t, v in entries.items()})
    return out


def _largest_difference(a: list[dict[int, float]], b: list[dict[int, float]]) -> float:
    """The largest log-prob difference between two probes (inf when they name different positions or tokens)."""
    if len(a) != len(b) or any(x.keys() != y.keys() for x, y in zip(a, b, strict=True)):
        return float("inf")
    return max((abs(x[t] - y[t]) for x, y in zip(a, b, strict=True) for t in x), default=0.0)


def _close(a: list[dict[int, float]], b: list[dict[int, float]]) -> bool:
    """Whether two probes agree to 1e-3 (a nondeterministic raw server) rather than differ by a temperature."""
    return _largest_difference(a, b) < 1e-3
