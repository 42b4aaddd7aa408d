"""A stand-in for vLLM's OpenAI-compatible server, on loopback, for the default test run (no vllm package).

It answers the calls opdlab's `vllm_server` teacher makes, in vLLM's format: GET /v1/models, POST /tokenize and
/detokenize,
POST /v1/completions with `prompt_logprobs` (top-k plus the actual token, or -1 for every token; the first
position null; echo with max_tokens 0) and greedy generation with `return_token_ids`. Log-probs come from a
real local HF model in float32, so a fit against it can be compared with the same model as a local teacher.
Faults on request: refuse `prompt_logprobs` above `max_logprobs` (vLLM's 400 and its words), leave the
log-probs out, stop answering after some requests, answer slowly. The real server is tested in the vllm
environment (tests/test_served_teacher_vllm.py).
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch


class FakeVLLM:
    """One model served on 127.0.0.1 (a free port). `url` is its base URL (…/v1)."""

    def __init__(self, model_dir: str, served_name: str | None = None, max_logprobs: int = -1, max_model_len: int = 64,
                 fail_after: int | None = None, prompt_logprobs: bool = True, delay_s: float = 0.0) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.root = str(Path(model_dir).resolve())
        self.name = served_name or model_dir
        self.max_logprobs, self.max_model_len = max_logprobs, max_model_len
        self.fail_after, self.prompt_logprobs, self.delay_s = fail_after, prompt_logprobs, delay_s
        self.answered = 0
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self.handler())
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self) -> FakeVLLM:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    # ----------------------------------------------------------------------------- answers
    @torch.no_grad()
    def logprobs(self, ids: list[int]) -> torch.Tensor:
        out = self.model(input_ids=torch.tensor([ids]), use_cache=False)
        return torch.log_softmax(out.logits[0].float(), -1)  # (n, V): row j predicts token j + 1

    def prompt_logprob_entries(self, ids: list[int], k: int) -> list[dict | None]:
        logp = self.logprobs(ids)
        entries: list[dict | None] = [None]
        for j in range(1, len(ids)):
            row = logp[j - 1]
            chosen = row.argsort(descending=True).tolist() if k == -1 else row.topk(k).indices.tolist()
            entry = {}
            for token in [ids[j], *chosen]:
                value = float(row[token])
                entry[str(token)] = {"logprob": value, "rank": int((row > row[token]).sum()) + 1,
                                     "decoded_token": self.tokenizer.decode([token])}
            entries.append(entry)
        return entries

    @torch.no_grad()
    def greedy(self, ids: list[int], max_tokens: int) -> list[int]:
        out = []
        for _ in range(max_tokens):
            token = int(self.logprobs(ids + out)[-1].argmax())
            out.append(token)
            if token == self.tokenizer.eos_token_id:
                break
        return out

    def completions(self, body: dict) -> tuple[int, dict]:
        with self.lock:
            self.answered += 1
            count = self.answered
        if self.fail_after is not None and count > self.fail_after:
            return 503, {"error": {"message": "the engine is dead", "type": "ServiceUnavailable", "code": 503}}
        k = body.get("prompt_logprobs")
        vocab = self.model.config.vocab_size
        allowed = vocab if self.max_logprobs == -1 else self.max_logprobs
        if k is not None and (k > allowed or (k == -1 and self.max_logprobs != -1)):
            return 400, {"error": {"message": f"Requested prompt logprobs of {k}, which is greater than max allowed: "
                                              f"{allowed}", "type": "BadRequestError", "param": "prompt_logprobs", "code": 400}}
        choices = []
        for index, ids in enumerate(body["prompt"]):
            if len(ids) + body.get("max_tokens", 16) > self.max_model_len:
                return 400, {"error": {"message": f"This model's maximum context length is {self.max_model_len} tokens",
                                       "type": "BadRequestError", "code": 400}}
            generated = self.greedy(ids, body["max_tokens"]) if body.get("max_tokens") else []
            entries = self.prompt_logprob_entries(ids, k) if k is not None and self.prompt_logprobs else None
            choices.append({"index": index, "text": self.tokenizer.decode(generated), "prompt_logprobs": entries,
                            "token_ids": generated if body.get("return_token_ids") else None})
        return 200, {"object": "text_completion", "model": self.name, "choices": choices}

    def handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet
                pass

            def reply(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                if self.path == "/v1/models":
                    self.reply(200, {"object": "list", "data": [{"id": fake.name, "root": fake.root,
                                                                  "max_model_len": fake.max_model_len}]})
                else:
                    self.reply(404, {"detail": "Not Found"})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if fake.delay_s:
                    threading.Event().wait(fake.delay_s)
                if self.path == "/tokenize":
                    ids = fake.tokenizer(body["prompt"], add_special_tokens=body.get("add_special_tokens", True))["input_ids"]
                    self.reply(200, {"count": len(ids), "max_model_len": fake.max_model_len, "tokens": ids})
                elif self.path == "/detokenize":
                    self.reply(200, {"prompt": fake.tokenizer.decode(body["tokens"])})
                elif self.path == "/v1/completions":
                    self.reply(*fake.completions(body))
                else:
                    self.reply(404, {"detail": "Not Found"})

        return Handler
