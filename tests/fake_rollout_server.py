"""A stand-in for a vLLM server of the *student* (the `vllm_fleet` rollout producer's servers), on loopback, for the
default test run (no vllm package).

It answers what `opdlab.pipeline.fleet.FleetProducer` asks, in vLLM's format: GET /v1/models (the base with its
`max_model_len`, loaded adapters with their `parent`), POST /tokenize and /detokenize, the dev-mode weight endpoints
(/pause, /resume, /collective_rpc reload_weights from a folder's model.safetensors, /update_weight_version,
GET /weight_info), runtime LoRA (/v1/load_lora_adapter, /v1/unload_lora_adapter: the adapter is merged into a copy
of the current base) and POST /v1/completions with token-id prompts, `return_token_ids`, `logprobs` and a per-request
seed. It generates with a real local HF model in float32 and samples the way opdlab's engines do: the uniforms of a
row come from a generator seeded with the request's seed (as `opdlab.rollout.per_row_uniforms` seeds row (prompt
seed, sample)), the token by inverse CDF over the processed distribution, so a fleet fit reproduces the local
engines' rollouts. `logprobs_mode` "processed" (vLLM's --logprobs-mode processed_logprobs) or "raw" (vLLM's default).

Faults on request (`faults`, a dict that may change while it runs): `model` (answer with another model name),
`token_id` (the first token replaced), `logprob` (the first log-prob replaced: NaN, 0.5 ...), `too_many` (extra
tokens), `drop` (a choice field left out), `choices` (answer this many choices), `delay_s` (answer completions late),
`relabel_after` (after this many completions /weight_info reports another trainer's label), `reload_fail_from`
(reload_weights fails from this reload on, counted from 1), `reload_noop` (reload answers success and keeps the old
weights), `stop_early` (the first choice stops after this many tokens on one that is not EOS, as a stop id of a
server's generation config would), `no_dev_mode` (the dev endpoints answer 404), `tokenize_shift` (/tokenize
gives other ids), `larger_vocabulary` (/detokenize knows ids past the student's tokenizer). Connections idle for
`keep_alive_s` are closed by the server, as uvicorn does after 5 s. `stop()` kills it: open connections cut, new
ones refused.
"""

from __future__ import annotations

import copy
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import torch

from opdlab.rollout import inverse_cdf_sample, sampling_logprobs

DEV_PATHS = ("/pause", "/resume", "/collective_rpc", "/update_weight_version", "/weight_info")


class Backlogged(ThreadingHTTPServer):
    request_queue_size = 1024  # as uvicorn's 2048: a fleet opens a connection per row (http.server's default is 5)


class FakeRolloutServer:
    """One student served on 127.0.0.1 (a free port). `url` is its base URL (…/v1)."""

    def __init__(self, model_dir: str, served_name: str | None = None, max_model_len: int = 64,
                 logprobs_mode: str = "processed", faults: dict | None = None, keep_alive_s: float = 1.0) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.root = str(Path(model_dir).resolve())
        self.name = served_name or model_dir
        self.max_model_len, self.logprobs_mode = max_model_len, logprobs_mode
        self.faults = dict(faults or {})
        self.label = "default"
        self.adapters: dict[str, tuple[str, dict]] = {}  # name -> (path, {parameter: delta})
        self.merged: dict[tuple[str, int], torch.nn.Module] = {}
        self.reloads: list[str] = []  # folders reloaded from, in order
        self.requests: list[dict] = []  # completion bodies, in arrival order
        self.calls: list[str] = []  # every POST path, in order
        self.paused = False
        self.lock = threading.Lock()
        self.keep_alive_s = keep_alive_s
        self.sockets: set = set()  # open connections, cut by stop()
        self.server = Backlogged(("127.0.0.1", 0), self.handler())
        self.server.daemon_threads = True
        self.server.handle_error = lambda request, address: None  # a client that hung up: nothing to say
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.alive = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self) -> FakeRolloutServer:
        self.thread.start()
        self.alive = True
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        if self.alive:
            self.alive = False
            self.server.shutdown()
            self.server.server_close()
            for sock in list(self.sockets):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    # ----------------------------------------------------------------------------- weights
    def reload(self, folder: str) -> tuple[int, dict]:
        from safetensors.torch import load_file

        count = len(self.reloads) + 1
        fail_from = self.faults.get("reload_fail_from")
        if fail_from is not None and count >= fail_from:
            return 500, error(f"Call to collective_rpc method failed: Worker failed with error 'disk quota exceeded "
                              f"reading {folder}'", 500)
        path = Path(folder) / "model.safetensors"
        if not path.is_file():
            return 500, error(f"Repo id must be in the form 'repo_name' or 'namespace/repo_name': '{folder}'", 500)
        state = load_file(str(path))
        params = dict(self.model.named_parameters(remove_duplicate=False))
        missing = sorted(set(params) - set(state))
        unknown = sorted(set(state) - set(params))
        if unknown or missing:
            return 500, error(f"weights not loaded: missing {missing[:3]}, unknown {unknown[:3]}", 500)
        with self.lock:
            self.reloads.append(folder)
            if not self.faults.get("reload_noop"):
                with torch.no_grad():
                    for name, value in state.items():
                        params[name].copy_(value)
            self.merged.clear()
        return 200, {"results": [None]}

    def load_adapter(self, body: dict) -> tuple[int, dict]:
        from safetensors.torch import load_file

        name, folder = body.get("lora_name"), body.get("lora_path")
        if name in self.adapters and not body.get("load_inplace"):
            return 400, error(f"The lora adapter '{name}' has already been loaded. If you want to load the adapter in "
                              "place, set 'load_inplace' to True.", 400)
        try:
            config = json.loads((Path(folder) / "adapter_config.json").read_text())
            state = load_file(str(Path(folder) / "adapter_model.safetensors"))
        except OSError as err:
            return 400, error(f"Loading lora {name} failed: {err}", 400)
        scaling = config["lora_alpha"] / config["r"]
        deltas = {}
        for key, a in state.items():
            if ".lora_A." not in key:
                continue
            b = state[key.replace(".lora_A.", ".lora_B.")]
            layer = key.removeprefix("base_model.model.").replace(".lora_A.weight", "")
            deltas[f"{layer}.weight"] = scaling * (b.float() @ a.float())
        with self.lock:
            self.adapters[name] = (folder, deltas)
            self.merged = {k: v for k, v in self.merged.items() if k[0] != name}
        return 200, f"Success: LoRA adapter '{name}' added successfully."

    def model_for(self, name: str) -> torch.nn.Module | None:
        """The base, or a copy of it with the adapter `name` merged (None: no such model)."""
        if name == self.name:
            return self.model
        if name not in self.adapters:
            return None
        key = (name, len(self.reloads))
        if key not in self.merged:
            merged = copy.deepcopy(self.model)
            params = dict(merged.named_parameters())
            with torch.no_grad():
                for param, delta in self.adapters[name][1].items():
                    params[param] += delta
            self.merged[key] = merged
        return self.merged[key]

    # ----------------------------------------------------------------------------- completions
    @torch.no_grad()
    def sample(self, model, prompt: list[int], body: dict) -> tuple[list[int], list[float]]:
        temperature, top_p = float(body.get("temperature", 1.0)), float(body.get("top_p", 1.0))
        max_tokens = int(body.get("max_tokens", 16))
        stops = set(body.get("stop_token_ids") or [])
        if not body.get("ignore_eos"):
            stops.add(self.tokenizer.eos_token_id)
        seed = body.get("seed")
        generator = torch.Generator().manual_seed(int(seed) if seed is not None else int(time.time_ns()))
        uniforms = torch.rand(max_tokens, generator=generator, dtype=torch.float64)
        ids, tokens, logps = list(prompt), [], []
        for step in range(max_tokens):
            logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[:, -1].float()  # (1, V)
            raw = torch.log_softmax(logits, -1)
            if temperature == 0:
                processed, token = raw, int(raw.argmax(-1))
            else:
                processed = sampling_logprobs(logits, temperature, top_p)
                token = int(inverse_cdf_sample(processed, uniforms[step : step + 1]))
            chosen = processed if self.logprobs_mode == "processed" else raw
            tokens.append(token)
            logps.append(float(chosen[0, token]))
            ids.append(token)
            if token in stops:
                break
        return tokens, logps

    def completions(self, body: dict) -> tuple[int, dict]:
        if self.faults.get("delay_s"):
            time.sleep(self.faults["delay_s"])
        with self.lock:
            self.requests.append(body)
            count = len(self.requests)
            after = self.faults.get("relabel_after")
            if after is not None and count >= after:
                self.label = "someone-else-v7"
            model = self.model_for(body.get("model"))
        if model is None:
            return 404, error(f"The model `{body.get('model')}` does not exist.", 404)
        prompts = body["prompt"]
        prompts = prompts if prompts and isinstance(prompts[0], list) else [prompts]
        choices = []
        for ids in prompts:
            if len(ids) + int(body.get("max_tokens", 16)) > self.max_model_len:
                return 400, error(f"This model's maximum context length is {self.max_model_len} tokens", 400)
            for _ in range(int(body.get("n", 1))):
                tokens, logps = self.sample(model, ids, body)
                choices.append(self.choice(len(choices), tokens, logps, int(body.get("max_tokens", 16))))
        faults = self.faults
        first = choices[0]
        if "token_id" in faults:
            first["token_ids"][0] = faults["token_id"]
        if "logprob" in faults:
            first["logprobs"]["token_logprobs"][0] = faults["logprob"]
        if faults.get("stop_early"):  # stopped on another token than EOS, as a generation config's stop id would
            keep = first["token_ids"][: faults["stop_early"]]
            eos = self.tokenizer.eos_token_id
            first["token_ids"] = keep[:-1] + [keep[-1] if keep[-1] != eos else eos + 1]
            first["logprobs"]["token_logprobs"] = first["logprobs"]["token_logprobs"][: len(keep)]
            first["finish_reason"] = "stop"
        if faults.get("too_many"):
            first["token_ids"] += [first["token_ids"][-1]] * faults["too_many"]
            first["logprobs"]["token_logprobs"] += [-0.1] * faults["too_many"]
        if "drop" in faults:
            if faults["drop"] == "token_logprobs":
                del first["logprobs"]["token_logprobs"]
            else:
                del first[faults["drop"]]
        if "choices" in faults:
            choices = (choices * faults["choices"])[: faults["choices"]]
        name = faults.get("model", body.get("model"))
        return 200, {"id": f"cmpl-{count}", "object": "text_completion", "created": int(time.time()), "model": name,
                     "choices": choices, "usage": {"prompt_tokens": sum(map(len, prompts))}}

    def choice(self, index: int, tokens: list[int], logps: list[float], max_tokens: int) -> dict:
        finish = "length" if len(tokens) == max_tokens and tokens[-1] != self.tokenizer.eos_token_id else "stop"
        return {"index": index, "text": self.tokenizer.decode(tokens, skip_special_tokens=True),
                "token_ids": list(tokens), "finish_reason": finish, "stop_reason": None,
                "logprobs": {"tokens": [f"token_id:{t}" for t in tokens], "token_logprobs": list(logps),
                             "top_logprobs": [{f"token_id:{t}": lp} for t, lp in zip(tokens, logps)],
                             "text_offset": [0] * len(tokens)}}

    # ----------------------------------------------------------------------------- HTTP
    def models(self) -> dict:
        data = [{"id": self.name, "object": "model", "root": self.root, "parent": None,
                 "max_model_len": self.max_model_len}]
        data += [{"id": name, "object": "model", "root": path, "parent": self.name, "max_model_len": self.max_model_len}
                 for name, (path, _) in self.adapters.items()]
        return {"object": "list", "data": data}

    def post(self, path: str, query: str, body: dict) -> tuple[int, object]:
        self.calls.append(path)
        if path.startswith(DEV_PATHS) and self.faults.get("no_dev_mode"):
            return 404, {"detail": "Not Found"}
        if path == "/tokenize":
            ids = self.tokenizer(body["prompt"], add_special_tokens=body.get("add_special_tokens", True))["input_ids"]
            ids = [i + self.faults.get("tokenize_shift", 0) for i in ids]
            return 200, {"count": len(ids), "max_model_len": self.max_model_len, "tokens": ids}
        if path == "/detokenize":
            if self.faults.get("larger_vocabulary"):
                return 200, {"prompt": "<extra_token>"}
            return 200, {"prompt": self.tokenizer.decode(body["tokens"])}
        if path == "/v1/completions":
            return self.completions(body)
        if path == "/pause":
            self.paused = True
            return 200, {"status": "paused"}
        if path == "/resume":
            self.paused = False
            return 200, {"status": "resumed"}
        if path == "/collective_rpc":
            if body.get("method") != "reload_weights":
                return 400, error(f"unknown method {body.get('method')}", 400)
            return self.reload((body.get("kwargs") or {}).get("weights_path"))
        if path == "/update_weight_version":
            self.label = body["new_version"]
            return 200, {"success": True, "new_version": self.label}
        if path == "/v1/load_lora_adapter":
            return self.load_adapter(body)
        if path == "/v1/unload_lora_adapter":
            with self.lock:
                self.adapters.pop(body.get("lora_name"), None)
            return 200, f"Success: LoRA adapter '{body.get('lora_name')}' removed successfully."
        return 404, {"detail": "Not Found"}

    def handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as vLLM's server
            timeout = fake.keep_alive_s  # an idle connection is closed (uvicorn: after 5 s)

            def setup(self) -> None:
                super().setup()
                fake.sockets.add(self.connection)

            def finish(self) -> None:
                fake.sockets.discard(self.connection)
                try:
                    super().finish()
                except OSError:
                    pass

            def log_message(self, *args) -> None:  # quiet
                pass

            def reply(self, status: int, body: object) -> None:
                text = isinstance(body, str)  # vLLM's LoRA endpoints answer a success in plain text
                data = body.encode() if text else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "text/plain" if text else "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                path = urlsplit(self.path).path
                if path == "/v1/models":
                    self.reply(200, fake.models())
                elif path == "/health":
                    self.reply(200, {})
                elif path == "/weight_info" and not fake.faults.get("no_dev_mode"):
                    self.reply(200, {"weight_version": fake.label})
                else:
                    self.reply(404, {"detail": "Not Found"})

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else {}
                parts = urlsplit(self.path)
                self.reply(*fake.post(parts.path, parts.query, body))

        return Handler


def error(message: str, code: int) -> dict:
    kind = {400: "BadRequestError", 404: "NotFoundError", 500: "InternalServerError"}.get(code, "Error")
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def main() -> None:
    """`python tests/fake_rollout_server.py <student> [--faults JSON] [--url-file F]`: serve until SIGTERM (for
    benchmarks/adversarial.py's server behaviours); the URL is printed and written to `--url-file`."""
    import argparse
    import signal

    from opdlab.models import resolve_model_path

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("student", help="the student checkpoint the fit trains (a folder or toy:<name>/student)")
    parser.add_argument("--faults", default="{}", help="JSON: the faults of FakeRolloutServer (see the module doc)")
    parser.add_argument("--logprobs-mode", default="processed", choices=["processed", "raw"])
    parser.add_argument("--url-file", default=None)
    args = parser.parse_args()
    path = resolve_model_path(args.student)
    with FakeRolloutServer(path, served_name=args.student if not args.student.startswith("toy:") else path,
                           logprobs_mode=args.logprobs_mode, faults=json.loads(args.faults), keep_alive_s=5.0) as fake:
        print(fake.url, flush=True)
        if args.url_file:
            Path(args.url_file).write_text(fake.url)
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        stop.wait()


if __name__ == "__main__":
    main()
