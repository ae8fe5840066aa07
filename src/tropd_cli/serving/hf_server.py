"""A small teacher server over HF weights that speaks the part of vLLM's OpenAI-compatible API tropd uses.

``teacher.backend=server`` scores with a served teacher: in production ``vllm serve`` on a GPU node
(docs/teacher-server.md). This server answers the same requests from an HF model on the machine it runs on, for
CPUs, for tests (tests/serving/ start it as a real process on loopback) and as the reference of what the client
expects:

- ``GET /v1/models``: the served model's id and ``max_model_len``.
- ``POST /tokenize`` ``{prompt, add_special_tokens}`` -> ``{tokens, count, max_model_len}``;
  ``POST /detokenize`` ``{tokens}`` -> ``{prompt}``.
- ``POST /v1/completions`` with ``prompt`` as token ids (one list or a list of lists), ``max_tokens``,
  ``temperature``, ``top_p``, ``seed``, ``min_tokens``, ``stop_token_ids``, ``ignore_eos``, ``return_token_ids``
  and ``prompt_logprobs`` (vLLM's extensions): each choice carries ``token_ids`` and, per prompt position, vLLM's
  ``{token_id: {logprob, rank, decoded_token}}`` (``null`` at position 0) of the top ``prompt_logprobs`` tokens
  plus the actual one, raw (full vocabulary, temperature 1). More than ``--max-logprobs`` is a 400, as in vLLM.

    python -m tropd_cli.serving.hf_server --model smol-lab-teacher --port 8000

It prints ``tropd teacher server on http://HOST:PORT`` once it listens (``--port 0``: a free port). Faults a test
can switch on, each a way a real deployment goes wrong: ``--logprobs-mode processed`` (log-probs at the request's
temperature: vLLM's ``processed_logprobs``), ``--noise`` (scores that differ from call to call),
``--tokenizer NAME`` (another model's tokenizer), ``--fail-first N`` (the first N completions requests get a 503),
``--delay S`` (each completions request waits S seconds).
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch


class BadRequest(Exception):
    """A request the server refuses with a 400 and this message (vLLM's error body)."""


class HFTeacher:
    """The model behind the server: prompt log-probs and seeded sampling on token ids."""

    def __init__(self, model: Any, tokenizer: Any, *, name: str, max_logprobs: int, mode: str, noise: float) -> None:
        self.model, self.tokenizer, self.name = model.eval(), tokenizer, name
        self.max_logprobs, self.mode, self.noise = max_logprobs, mode, noise
        self.max_model_len = int(getattr(model.config, "max_position_embeddings", 2048))
        self.lock = threading.Lock()  # one forward at a time: the same numbers whatever the concurrency

    @torch.no_grad()
    def _logp(self, ids: list[int], temperature: float) -> torch.Tensor:
        logits = self.model(input_ids=torch.tensor([ids])).logits[0].double()
        if self.noise:
            logits = logits + self.noise * torch.randn_like(logits)
        t = temperature if self.mode == "processed" and temperature > 0 else 1.0
        return torch.log_softmax(logits / t, -1)

    def prompt_logprobs(self, ids: list[int], top_k: int, temperature: float) -> list[dict[str, Any] | None]:
        with self.lock:
            logp = self._logp(ids, temperature)
        out: list[dict[str, Any] | None] = [None]
        for pos in range(1, len(ids)):
            dist = logp[pos - 1]
            entries: dict[str, Any] = {}
            if top_k > 0:
                values, top = torch.topk(dist, min(top_k, dist.numel()))
                for rank, (tok, val) in enumerate(zip(top.tolist(), values.tolist(), strict=True), start=1):
                    entries[str(tok)] = {"logprob": val, "rank": rank, "decoded_token": self.tokenizer.decode([tok])}
            actual = ids[pos]
            if str(actual) not in entries:
                entries[str(actual)] = {
                    "logprob": float(dist[actual]),
                    "rank": int((dist > dist[actual]).sum()) + 1,
                    "decoded_token": self.tokenizer.decode([actual]),
                }
            out.append(entries)
        return out

    @torch.no_grad()
    def generate(self, ids: list[int], body: dict[str, Any]) -> tuple[list[int], str]:
        max_tokens = int(body.get("max_tokens") or 16)
        temperature = float(body.get("temperature", 1.0))
        top_p = float(body.get("top_p", 1.0))
        min_tokens = int(body.get("min_tokens", 0))
        stops = set(int(s) for s in body.get("stop_token_ids") or [])
        if not body.get("ignore_eos") and self.tokenizer.eos_token_id is not None:
            stops.add(int(self.tokenizer.eos_token_id))
        gen = torch.Generator().manual_seed(int(body.get("seed") or 0))
        tokens: list[int] = []
        reason = "length"
        with self.lock:
            for t in range(max_tokens):
                logits = self.model(input_ids=torch.tensor([ids + tokens])).logits[0, -1].double()
                if t < min_tokens:
                    for s in stops:
                        logits[s] = -float("inf")
                if temperature <= 0:
                    token = int(logits.argmax())
                else:
                    probs = torch.softmax(logits / temperature, -1)
                    if top_p < 1.0:
                        sorted_probs, order = torch.sort(probs, descending=True)
                        sorted_probs[(sorted_probs.cumsum(-1) - sorted_probs) >= top_p] = 0.0
                        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
                    token = int(torch.multinomial(probs.float(), 1, generator=gen))
                tokens.append(token)
                if token in stops:
                    reason = "stop"
                    break
        return tokens, reason


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], teacher: HFTeacher, *, fail_first: int, delay: float) -> None:
        super().__init__(address, Handler)
        self.teacher, self.fail_first, self.delay = teacher, fail_first, delay
        self.completions = 0
        self.counter_lock = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    server: Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet: tests read stdout for the address
        pass

    def _send(self, code: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, code: int, message: str) -> None:
        self._send(code, {"error": {"message": message, "type": "BadRequestError", "code": code}})

    def do_GET(self) -> None:
        t = self.server.teacher
        if self.path.rstrip("/") == "/v1/models":
            model = {"id": t.name, "object": "model", "owned_by": "tropd", "max_model_len": t.max_model_len}
            self._send(200, {"object": "list", "data": [model]})
        elif self.path.rstrip("/") == "/health":
            self._send(200, {})
        else:
            self._error(404, f"no route {self.path}")

    def do_POST(self) -> None:
        try:
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length) or b"{}")
            route = self.path.rstrip("/")
            if route == "/tokenize":
                self._send(200, self._tokenize(body))
            elif route == "/detokenize":
                self._send(200, {"prompt": self.server.teacher.tokenizer.decode(body["tokens"])})
            elif route == "/v1/completions":
                with self.server.counter_lock:
                    self.server.completions += 1
                    failing = self.server.completions <= self.server.fail_first
                if self.server.delay:
                    time.sleep(self.server.delay)
                if failing:
                    self._error(503, "the server is not ready (--fail-first)")
                    return
                self._send(200, self._complete(body))
            else:
                self._error(404, f"no route {self.path}")
        except BadRequest as err:
            self._error(400, str(err))
        except (KeyError, TypeError, ValueError) as err:
            self._error(400, f"malformed request: {err}")

    def _tokenize(self, body: dict[str, Any]) -> dict[str, Any]:
        t = self.server.teacher
        ids = t.tokenizer(body["prompt"], add_special_tokens=bool(body.get("add_special_tokens", True)))["input_ids"]
        return {"tokens": ids, "count": len(ids), "max_model_len": t.max_model_len}

    def _complete(self, body: dict[str, Any]) -> dict[str, Any]:
        t = self.server.teacher
        if body.get("model") not in (None, t.name):
            raise BadRequest(f"The model `{body.get('model')}` does not exist.")
        prompt = body["prompt"]
        prompts = [prompt] if prompt and isinstance(prompt[0], int) else prompt
        if not all(isinstance(p, list) and p and all(isinstance(i, int) for i in p) for p in prompts):
            raise BadRequest("prompt must be token ids: a list of ints or a list of such lists")
        want = body.get("prompt_logprobs")
        if want is not None and int(want) > t.max_logprobs:
            raise BadRequest(
                f"Requested prompt logprobs of {want}, which is greater than max allowed: {t.max_logprobs}"
            )
        vocab = t.model.get_output_embeddings().weight.shape[0]
        choices = []
        for i, ids in enumerate(prompts):
            if max(ids) >= vocab or min(ids) < 0:
                raise BadRequest(f"Token id {max(ids)} is out of vocabulary")
            tokens, reason = t.generate(ids, body)
            choice: dict[str, Any] = {
                "index": i,
                "text": t.tokenizer.decode(tokens),
                "finish_reason": reason,
                "logprobs": None,
            }
            if body.get("return_token_ids"):
                choice["prompt_token_ids"], choice["token_ids"] = ids, tokens
            if want is not None:
                choice["prompt_logprobs"] = t.prompt_logprobs(ids, int(want), float(body.get("temperature", 1.0)))
            choices.append(choice)
        return {"id": "cmpl-tropd", "object": "text_completion", "model": t.name, "choices": choices}


def build(args: argparse.Namespace) -> HFTeacher:
    from transformers import AutoTokenizer

    from tropd_cli.config import ModelConfig
    from tropd_cli.models import BUILDERS, default_cache_dir, load_model

    spec = json.loads(args.model_config) if args.model_config else {}
    cfg = ModelConfig(**{"name": args.model, "dtype": args.dtype, **spec})
    loaded = load_model(cfg, device=torch.device("cpu"), cache_dir=default_cache_dir(args.cache_dir), frozen=True)
    tokenizer = loaded.tokenizer
    if args.tokenizer in BUILDERS:  # (fault) a registry builder's tokenizer
        tokenizer = BUILDERS[args.tokenizer](ModelConfig(name=args.tokenizer))[1]
    elif args.tokenizer:  # (fault) a tokenizer directory or hub id
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    return HFTeacher(
        loaded.model,
        tokenizer,
        name=args.served_model_name or str(cfg.name),
        max_logprobs=args.max_logprobs,
        mode=args.logprobs_mode,
        noise=args.noise,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tropd_cli.serving.hf_server", description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="a tropd registry name, local directory or hub id")
    parser.add_argument("--model-config", default=None, help="more ModelConfig fields as JSON (tiny_layers, ...)")
    parser.add_argument("--served-model-name", default=None)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-logprobs", type=int, default=20, help="as vLLM's --max-logprobs (its default: 20)")
    parser.add_argument("--logprobs-mode", choices=("raw", "processed"), default="raw")
    parser.add_argument("--noise", type=float, default=0.0, help="(fault) logit noise per call")
    parser.add_argument("--tokenizer", default=None, help="(fault) serve another model's tokenizer")
    parser.add_argument("--fail-first", type=int, default=0, help="(fault) 503 for the first N completions")
    parser.add_argument("--delay", type=float, default=0.0, help="(fault) seconds each completions request waits")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    teacher = build(args)
    server = Server((args.host, args.port), teacher, fail_first=args.fail_first, delay=args.delay)
    host, port = str(args.host), int(server.server_address[1])
    print(f"tropd teacher server on http://{host}:{port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
