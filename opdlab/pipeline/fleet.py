"""`FleetProducer`: rollouts sampled by a data-parallel fleet of vLLM servers (`--model.pipeline.producer vllm_fleet
--model.pipeline.urls http://host:port/v1,...`; docs/runs.md, "Rollouts on a vLLM server fleet").

Each job's prompts are split across the servers in contiguous slices; every response row is one
`/v1/completions` request (token ids in and out, `n` 1, the row's own seed: from the prompt's seed and the sample
index, as the other engines derive it), sent from a thread pool; the answers are reassembled in the engines' row
order (prompt-major, sample-minor) into the `Rollout` the engines build.

Weights reach the servers after every optimizer step (`publish`), once no submitted job still needs the previous
ones:
- a full student: its weights (under the checkpoint's names, a tied head under both) are written as safetensors into
  the run folder (`<log_dir>/fleet_weights/v<version>-<tag>/model.safetensors`, the last two kept) and every server
  reloads them in place: `POST /pause?mode=wait` (drains requests, clears the prefix cache), `/collective_rpc
  reload_weights`, `/update_weight_version` (the label `opdlab-<tag>-v<version>`), `/resume`. The servers must read
  the run folder (one machine, or a shared filesystem) and run with VLLM_SERVER_DEV_MODE=1. vLLM's NCCL/IPC weight
  transfer (`--weight-transfer-config`) needs CUDA and is not used;
- a LoRA student (`--model.student_adapter.*`): the frozen base is reloaded once at the start, then after every step
  only the adapter is written (peft's format) and loaded under a version name (`POST /v1/load_lora_adapter`,
  `opdlab-<tag>-v<version>`; the previous one unloaded); every request names it and every answer's `model` field
  must echo it. An adapter vLLM's LoRA layers cannot take (on lm_head or the embeddings, rank > 512) is merged
  into full weights and reloaded every step instead, as the vllm engine does.

Before the first step every server is checked: it answers, serves the student (by path or name), tokenizes like
the student, takes the fit's longest sequence, runs in dev mode; after every sync a probe compares its
log-probs with the local student's at temperature 2 and at top-p 0.5, which catches a server that sends raw
log-probs (`--logprobs-mode processed_logprobs` missing) or holds other weights. Every answer is checked like user
input (choice count, the `model` field, token ids in the vocabulary, lengths within max_tokens, stops only on the
student's EOS, log-probs finite and <= 0), and each server's weight-version label is read before and after each
job's requests: a rollout is never returned for weights other than the job's version. Any failure ends the fit
with one `PipelineError` line naming the server and what failed.
"""

from __future__ import annotations

import math
import secrets
import socket
import threading
import time
import warnings
from collections import deque
from concurrent.futures import FIRST_EXCEPTION, CancelledError, Future, ThreadPoolExecutor, wait
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path

import torch

from opdlab.console import error_summary
from opdlab.distributed import world_size
from opdlab.pipeline.producers import Job, PipelineError, Produced, ProducerContext, RolloutProducer
from opdlab.rollout import Rollout, derive_seed, sampling_logprobs
from opdlab.teachers.http import JsonClient, ServerError, Unreachable, split_url
from opdlab.teachers.vllm_server import same_model_keys

REQUESTS_PER_SERVER = 64  # row requests in flight per server (vLLM batches whatever is in flight)
KEEP_WEIGHT_FOLDERS = 2  # the newest weight folders kept in the run folder
PROBE_SEED = 1234
PROBE_TOLERANCE = 0.05  # mean |log-prob difference| between a server and the local student (nats) in the probe
UNSERVABLE_LORA = {"lm_head", "embed_tokens", "wte", "word_embeddings"}
MAX_LORA_RANK = 512
CHECK_TIMEOUT = 60.0  # seconds for each answer of the checks before the first step
NOT_JSON = "answered something that is not JSON"  # `JsonClient`'s words for a body it cannot decode
START = ("VLLM_SERVER_DEV_MODE=1 python -m vllm.entrypoints.openai.api_server --model <student> "
         "--logprobs-mode processed_logprobs --max-model-len <prompt + response> --host ... --port ...")


class FleetFailure(Exception):
    """A fleet request or answer that ends the fit (raised in a worker thread; the trainer raises it as a
    `PipelineError` naming the step)."""


@dataclass
class Server:
    url: str
    client: JsonClient
    name: str = ""  # the served model's name (the `model` of every request in full-weight mode)
    max_model_len: int | None = None


class TrackedClient(JsonClient):
    """A `JsonClient` whose connections can all be cut from another thread (`close`), so that a request waiting on
    a slow or dead server ends at once when the fit does."""

    def __init__(self, base: str, timeout_s: float, registry: list, lock: threading.Lock) -> None:
        super().__init__(base, timeout_s)
        self.registry, self.registry_lock = registry, lock

    def connection(self):
        fresh = getattr(self.local, "conn", None) is None
        conn = super().connection()
        if fresh:
            with self.registry_lock:
                self.registry.append(conn)
        return conn

    def call(self, method: str, path: str, body: object | None = None, root: bool = False):
        """As `JsonClient.call`, once more on a new connection when a kept-alive one fails without an answer: the
        server closed it while idle (vLLM's uvicorn does after 5 s), which says nothing about the server."""
        reused = getattr(self.local, "conn", None) is not None
        try:
            return super().call(method, path, body, root)
        except Unreachable as err:
            if not reused or "timed out" in str(err) or NOT_JSON in str(err):
                raise
        return super().call(method, path, body, root)


class FleetProducer(RolloutProducer):
    """Rollouts from OpenAI-compatible vLLM servers at `urls` (one data-parallel fleet), weights synced after every
    optimizer step (see the module docstring). `timeout`: seconds for one request or one server's weight update."""

    name = "vllm_fleet"
    overlaps = True

    def __init__(self, urls: list[str], timeout: float = 600.0) -> None:
        if not urls:
            raise ValueError("the vllm_fleet producer needs at least one server URL (--model.pipeline.urls)")
        for url in urls:
            try:
                split_url(url)
            except ValueError as err:
                raise ValueError(f"pipeline.urls: {err}") from None
        self.urls, self.timeout = list(urls), float(timeout)
        self.servers: list[Server] = []
        self.pool: ThreadPoolExecutor | None = None  # row requests, label checks, syncs
        self.jobs_pool: ThreadPoolExecutor | None = None  # one job at a time, in order
        self.futures: dict[int, Future] = {}
        self.submitted: dict[int, Future] = {}  # every job not yet known finished (publish waits for them)
        self.version: int | None = None
        self.failure: str | None = None
        self.stop = threading.Event()
        self.connections: list = []
        self.lock = threading.Lock()
        self.folders: deque[tuple[Path, list[Path]]] = deque()  # weight folders written by this fit, oldest first
        self.adapters: list[tuple[int, str]] = []  # (version, name) of adapters loaded on the servers
        self.probed = False
        self.tag = ""

    # ----------------------------------------------------------------------------- set-up and checks
    def start(self, context: ProducerContext) -> None:
        super().start(context)
        if world_size() > 1:
            raise PipelineError(f"the vllm_fleet producer runs in a single training process (this fit has "
                                f"{world_size()}): one trainer publishes the weights its servers sample with")
        module = context.module
        self.close()  # a second fit with the same module starts afresh
        self.stop = threading.Event()
        self.failure, self.version, self.probed = None, None, False
        self.tag = secrets.token_hex(3)
        self.connections = []
        self.folders, self.adapters = deque(), []
        self.futures, self.submitted = {}, {}
        self.pool = ThreadPoolExecutor(REQUESTS_PER_SERVER * len(self.urls), thread_name_prefix="opdlab-fleet")
        self.jobs_pool = ThreadPoolExecutor(1, thread_name_prefix="opdlab-fleet-jobs")
        self.student, self.tokenizer = module.student, module.tokenizer
        self.eos, self.pad = module.tokenizer.eos_token_id, module.tokenizer.pad_token_id
        self.vocab = int(module.student.get_output_embeddings().weight.shape[0])
        self.lora = self.serves_adapter(module)
        self.weights_root = self.weights_folder(module)
        from opdlab.building import max_sequence_len

        longest = max_sequence_len(module.student_path, module.rollout_options)
        self.servers = [Server(url, TrackedClient(url, self.timeout, self.connections, self.lock)) for url in self.urls]
        for server in self.servers:  # with a client of at most CHECK_TIMEOUT s: an address nothing answers fails fast
            checking = Server(server.url, TrackedClient(server.url, min(self.timeout, CHECK_TIMEOUT), self.connections,
                                                        self.lock))
            self.check_server(checking, module.student_path, longest)
            server.name, server.max_model_len = checking.name, checking.max_model_len

    def serves_adapter(self, module) -> bool:
        """True: the student's LoRA adapter is loaded on the servers each step; False: full weights (a student
        without an adapter, or one whose adapter vLLM cannot serve: merged, as the vllm engine does)."""
        from opdlab.adapters import adapter_config, is_adapted

        options = getattr(module, "adapter_options", None)
        if not (options is not None and options.enabled and is_adapted(module.student)):
            return False
        config = adapter_config(module.student)
        targets = {config.target_modules} if isinstance(config.target_modules, str) else set(config.target_modules)
        unservable = sorted(targets & UNSERVABLE_LORA)
        if unservable or config.r > MAX_LORA_RANK:
            reason = f"an adapter on {unservable}" if unservable else f"rank {config.r} > {MAX_LORA_RANK}"
            warnings.warn(f"vllm_fleet producer: vLLM's LoRA layers do not take {reason}; the servers get the adapter "
                          "merged into full weights instead (the whole model is written and reloaded every step)",
                          stacklevel=3)
            return False
        return True

    def weights_folder(self, module) -> Path:
        """`<log_dir>/fleet_weights`: the run folder, which the servers must be able to read."""
        try:
            trainer = module.trainer
        except (AttributeError, RuntimeError):  # a LightningModule outside a Trainer
            trainer = None
        root = getattr(trainer, "log_dir", None) or getattr(trainer, "default_root_dir", None) or "."
        return Path(root).resolve() / "fleet_weights"

    def check_server(self, server: Server, student_path: str, longest: int) -> None:
        """One server's identity and limits, before any weights move."""
        url, client = server.url, server.client
        try:
            reply = client.call("GET", "/models")
        except Unreachable as err:
            raise PipelineError(f"vllm_fleet producer: no server answers at {url} ({unreachable_reason(err)}); start "
                                f"one ({START}) or correct --model.pipeline.urls") from None
        except ServerError as err:
            raise PipelineError(f"vllm_fleet producer: {url} is not an OpenAI-compatible server (GET {err.url} "
                                f"answered HTTP {err.status}); vLLM's URL ends in /v1, e.g. "
                                "http://127.0.0.1:8000/v1") from None
        listed = reply.body.get("data") if isinstance(reply.body, dict) else None
        if not isinstance(listed, list) or not all(isinstance(m, dict) and isinstance(m.get("id"), str)
                                                   for m in listed):
            raise PipelineError(f"vllm_fleet producer: {url}/models lists no model (field `data`); is it an "
                                "OpenAI-compatible server?")
        bases = [m for m in listed if not m.get("parent")]  # LoRA adapters name their base as `parent`
        wanted = same_model_keys(student_path)
        chosen = next((m for m in bases if wanted & (same_model_keys(m["id"]) | same_model_keys(m.get("root")))),
                      None)
        if chosen is None:
            listing = ", ".join(m["id"] + (f" (loaded from {m['root']})" if m.get("root") not in (None, m["id"])
                                           else "") for m in bases) or "nothing"
            raise PipelineError(f"vllm_fleet producer: {url} serves {listing}, not the student {student_path} (field "
                                f"`model`); start it with --model {student_path}, the student the fit trains")
        server.name = chosen["id"]
        limit = chosen.get("max_model_len")
        server.max_model_len = limit if isinstance(limit, int) and not isinstance(limit, bool) else None
        if server.max_model_len is not None and server.max_model_len < longest:
            raise PipelineError(
                f"vllm_fleet producer: {url} takes sequences of at most {server.max_model_len} tokens (field "
                f"`max_model_len`, its --max-model-len) and this fit samples up to {longest} (prompt + response); "
                f"restart it with --max-model-len {longest} or lower --model.rollout.max_prompt_len / max_new_tokens")
        self.check_tokenizer(server)
        try:
            client.call("GET", "/weight_info", root=True)
        except (ServerError, Unreachable) as err:
            raise PipelineError(f"vllm_fleet producer: {url} has no weight-update endpoints (GET /weight_info: "
                                f"{err}); start it with VLLM_SERVER_DEV_MODE=1 (opdlab reloads its weights through "
                                "/collective_rpc and labels them with /update_weight_version)") from None

    def check_tokenizer(self, server: Server) -> None:
        """The server tokenizes a probe text (a spread of the student's vocabulary and its special tokens) into the
        student's ids, and has no token past the student's tokenizer (field `tokenizer`)."""
        tokenizer, url = self.tokenizer, server.url
        size = len(tokenizer)
        ids = sorted({int(i) for i in torch.linspace(0, size - 1, min(size, 64)).round().tolist()})
        text = tokenizer.decode(ids) + "".join(t for t in (tokenizer.eos_token, tokenizer.bos_token) if t)
        expected = tokenizer(text, add_special_tokens=False)["input_ids"]
        try:
            got = server.client.call("POST", "/tokenize", {"model": server.name, "prompt": text, "add_special_tokens":
                                                           False}, root=True).body.get("tokens")
        except (ServerError, Unreachable, AttributeError) as err:
            warnings.warn(f"vllm_fleet producer: could not check the tokenizer of {url} (POST /tokenize: {err}); "
                          "make sure it serves the student", stacklevel=3)
            return
        if got != expected:
            at = next((i for i, (a, b) in enumerate(zip(expected, got or [])) if a != b),
                      min(len(expected), len(got or [])))
            raise PipelineError(
                f"vllm_fleet producer: {url} ({server.name}) tokenizes differently from the student (field "
                f"`tokenizer`): a probe text gives {expected[at:at + 4]} for the student and {(got or [])[at:at + 4]} "
                f"on the server at token {at}; serve the student's own checkpoint")
        try:
            extra = server.client.call("POST", "/detokenize", {"model": server.name, "tokens": [size]},
                                       root=True).body.get("prompt")
        except (ServerError, Unreachable, AttributeError):
            return  # refused: the server's tokenizer has no such id either
        if extra:
            raise PipelineError(f"vllm_fleet producer: {url} ({server.name}) has a larger vocabulary than the "
                                f"student's tokenizer ({size} tokens; field `tokenizer`): its token {size} is "
                                f"{extra!r}; serve the student's own checkpoint")

    # ----------------------------------------------------------------------------- weights
    def label(self, version: int) -> str:
        return f"opdlab-{self.tag}-v{version}"

    def publish(self, version: int, student: torch.nn.Module) -> None:
        """Wait for every submitted job (they name older versions), write `version`'s weights and load them on every
        server; returns when each holds them (its label read back)."""
        try:
            self.sync(version, student)
        except PipelineError as err:
            self.failure = self.failure or str(err)  # the servers' weights are unknown: nothing more is sampled
            raise

    def sync(self, version: int, student: torch.nn.Module) -> None:
        self.raise_failure()
        self.wait_submitted(version)
        self.raise_failure()
        first = self.version is None
        if self.lora:
            if first:  # the frozen base, once: the servers may hold another fit's weights
                self.reload_all(version, self.write_weights(student, "base", merged=False), "the student's base")
            self.load_adapter_all(version, self.write_adapter(student, version))
        else:
            self.reload_all(version, self.write_weights(student, f"v{version}", merged=True),
                            f"policy version {version}")
        self.version = version
        try:
            labels = self.parallel(self.read_label, self.servers)
        except FleetFailure as err:
            raise PipelineError(f"vllm_fleet producer: after the weight sync of policy version {version} "
                                f"{self.where()}: {err}") from None
        for server, held in zip(self.servers, labels, strict=True):
            if held != self.label(version):
                raise PipelineError(f"vllm_fleet producer: after the weight sync of policy version {version} "
                                    f"{self.where()}, {server.url} reports weight version {held!r} (GET "
                                    f"/weight_info), not {self.label(version)!r}")
        # Every sync, not only the first: a server that acknowledges a reload but keeps its old weights is caught as
        # soon as the two policies differ by more than the probe's tolerance (2 short requests per server and step).
        self.probe(student)
        self.probed = True

    def wait_submitted(self, version: int) -> None:
        with self.lock:
            pending = [(i, f) for i, f in self.submitted.items() if not f.done()]
        deadline = time.monotonic() + self.timeout
        for index, future in pending:
            try:
                future.exception(timeout=max(deadline - time.monotonic(), 0.001))
            except CancelledError:
                continue
            except FutureTimeout:
                raise PipelineError(f"vllm_fleet producer: waited {self.timeout:.0f} s for job {index}'s rollouts "
                                    f"before loading policy version {version} {self.where()} "
                                    "(--model.pipeline.timeout)") from None
        with self.lock:
            self.submitted = {i: f for i, f in self.submitted.items() if not f.done()}

    def write_weights(self, student, stem: str, merged: bool) -> tuple[Path, list[Path]]:
        """The student's weights (merged with its adapter, or the base alone) as one safetensors file in a new folder
        of the run folder; the folder and file are this fit's own (never written over)."""
        from safetensors.torch import save_file

        from opdlab.adapters import plain_parameters

        folder = self.new_folder(stem)
        tensors, seen = {}, set()
        for name, tensor in plain_parameters(student, merged=merged):
            tensor = tensor.detach().to("cpu").contiguous()
            storage = tensor.untyped_storage().data_ptr()
            if storage in seen:  # a tied head under both names (vLLM's in-place reload needs each): its own copy
                tensor = tensor.clone()
            seen.add(tensor.untyped_storage().data_ptr())
            tensors[name] = tensor
        path = folder / "model.safetensors"
        try:
            save_file(tensors, str(path), metadata={"format": "pt"})
        except OSError as err:
            raise PipelineError(f"vllm_fleet producer: could not write the weights for the servers to {path} "
                                f"{self.where()}: {error_summary(err)}") from None
        return self.remember(folder, [path])

    def write_adapter(self, student, version: int) -> tuple[Path, list[Path]]:
        from opdlab.adapters import save_adapter

        folder = self.new_folder(f"v{version}")
        try:
            save_adapter(student, folder, self.context.module.student_path)
        except OSError as err:
            raise PipelineError(f"vllm_fleet producer: could not write the adapter for the servers to {folder} "
                                f"{self.where()}: {error_summary(err)}") from None
        return self.remember(folder, [folder / "adapter_model.safetensors", folder / "adapter_config.json"])

    def new_folder(self, stem: str) -> Path:
        folder = self.weights_root / f"{stem}-{self.tag}"
        try:
            folder.parent.mkdir(parents=True, exist_ok=True)
            folder.mkdir()
        except FileExistsError:
            raise PipelineError(f"vllm_fleet producer: {folder} exists already and was not written by this fit; "
                                "refusing to write over it") from None
        except OSError as err:
            raise PipelineError(f"vllm_fleet producer: cannot create {folder} for the servers' weights: "
                                f"{error_summary(err)}") from None
        return folder

    def remember(self, folder: Path, files: list[Path]) -> tuple[Path, list[Path]]:
        """Keep the newest `KEEP_WEIGHT_FOLDERS` folders this fit wrote; delete the files it wrote in older ones."""
        self.folders.append((folder, files))
        while len(self.folders) > KEEP_WEIGHT_FOLDERS:
            old, written = self.folders.popleft()
            for path in written:
                path.unlink(missing_ok=True)
            try:
                old.rmdir()
            except OSError:
                pass  # something else was put there: left as it is
        return folder, files

    def reload_all(self, version: int, written: tuple[Path, list[Path]], what: str) -> None:
        folder = str(written[0])
        self.sync_all(version, what, lambda server: self.reload(server, folder, version))

    def reload(self, server: Server, folder: str, version: int) -> None:
        """Pause (drain, clear the prefix cache), reload from `folder`, label, resume one server."""
        paused = False
        try:
            self.call(server, "POST", "/pause?mode=wait", None, "POST /pause?mode=wait")
            paused = True
            reply = self.call(server, "POST", "/collective_rpc", {"method": "reload_weights",
                                                                   "kwargs": {"weights_path": folder}},
                              f"POST /collective_rpc reload_weights from {folder}")
            results = reply.get("results") if isinstance(reply, dict) else None
            if not isinstance(results, list) or not results:
                raise FleetFailure(f"POST /collective_rpc reload_weights answered {str(reply)[:120]!r}, no worker "
                                   "results")
            self.call(server, "POST", "/update_weight_version", {"new_version": self.label(version)},
                      "POST /update_weight_version")
            self.call(server, "POST", "/resume", None, "POST /resume")
            paused = False
        finally:
            if paused:  # best effort: a server left paused would hold every later request
                try:
                    server.client.call("POST", "/resume", root=True)
                except (ServerError, Unreachable):
                    pass

    def load_adapter_all(self, version: int, written: tuple[Path, list[Path]]) -> None:
        name, folder = self.label(version), str(written[0])
        self.sync_all(version, f"the adapter of policy version {version}",
                      lambda server: self.load_adapter(server, name, folder, version))
        old = [(v, n) for v, n in self.adapters if v != version]
        self.adapters = [(version, name)]
        for _, stale in old:  # no job names them any more (publish waited for every job)
            self.parallel(lambda s, stale=stale: self.unload_adapter(s, stale), self.servers)

    def load_adapter(self, server: Server, name: str, folder: str, version: int) -> None:
        try:
            body = {"lora_name": name, "lora_path": folder, "load_inplace": True}
            self.call(server, "POST", "/load_lora_adapter", body, "POST /v1/load_lora_adapter", root=False, text=True)
        except FleetFailure as err:
            raise FleetFailure(f"{err} (a LoRA student needs the server started with --enable-lora --max-lora-rank "
                               ">= the adapter's rank and VLLM_ALLOW_RUNTIME_LORA_UPDATING=True)") from None
        self.call(server, "POST", "/update_weight_version", {"new_version": self.label(version)},
                  "POST /update_weight_version")

    def unload_adapter(self, server: Server, name: str) -> None:
        try:
            server.client.call("POST", "/unload_lora_adapter", {"lora_name": name})
        except (ServerError, Unreachable):
            pass  # it only costs the server memory

    def sync_all(self, version: int, what: str, action) -> None:
        """`action(server)` on every server at once; the first failure ends the fit naming the server."""
        futures = [(server, self.pool.submit(action, server)) for server in self.servers]
        failures = []
        for server, future in futures:
            try:
                future.result()
            except FleetFailure as err:
                failures.append((server, str(err)))
            except Exception as err:  # noqa: BLE001 - said in the one line
                failures.append((server, error_summary(err)))
        if failures:
            server, reason = failures[0]
            others = f" (and {len(failures) - 1} more server(s))" if len(failures) > 1 else ""
            raise PipelineError(f"vllm_fleet producer: the weight sync of {what} failed on {server.url}{others} "
                                f"{self.where()}: {reason}; the fleet's servers may now hold different weights")

    def call(self, server: Server, method: str, path: str, body, what: str, root: bool = True,
             text: bool = False) -> object:
        """A control request (on the server's root, or under its URL's /v1 with `root` False); failures as one
        `FleetFailure` naming the request. `text`: a success may answer plain text (vLLM's LoRA endpoints)."""
        try:
            return server.client.call(method, path, body, root=root).body
        except ServerError as err:
            raise FleetFailure(f"{what} answered HTTP {err.status}: {err.message}") from None
        except Unreachable as err:
            if text and NOT_JSON in str(err):  # an HTTP success (errors raise ServerError) in plain text
                return None
            raise FleetFailure(f"{what} got no answer ({unreachable_reason(err)})") from None

    def read_label(self, server: Server) -> str:
        """The weight-version label a server holds (GET /weight_info)."""
        try:
            body = self.call(server, "GET", "/weight_info", None, "GET /weight_info")
        except FleetFailure as err:
            raise FleetFailure(f"{server.url} stopped answering: {err}") from None
        label = body.get("weight_version") if isinstance(body, dict) else None
        if not isinstance(label, str):
            raise FleetFailure(f"{server.url} answered GET /weight_info without a `weight_version`: "
                               f"{str(body)[:120]!r}")
        return label

    def model_for(self, server: Server, version: int) -> str:
        """The `model` a request for `version` names, and every answer must echo."""
        return self.label(version) if self.lora else server.name

    # ----------------------------------------------------------------------------- the probe
    def probe(self, student) -> None:
        """A short seeded sample from every server at temperature 2 and at top-p 0.5, compared with the local
        student's log-probs of the same tokens: the server's must be those of the distribution sampled from
        (`--logprobs-mode processed_logprobs`) and of the student's weights."""
        size = len(self.tokenizer)
        specials = {self.eos, self.pad, getattr(self.tokenizer, "bos_token_id", None)}
        pool = [i for i in range(size) if i not in specials] or list(range(size))
        prompt = [pool[int(k * (len(pool) - 1) / 5)] for k in range(6)]
        for server in self.servers:
            room = (server.max_model_len or 10**9) - len(prompt)
            length = max(1, min(8, room))
            gaps_processed, gaps_raw = [], []
            for temperature, top_p in ((2.0, 1.0), (1.0, 0.5)):
                try:
                    tokens, logps = self.sample(server, self.version, prompt, temperature, top_p, PROBE_SEED, length,
                                                "the log-prob probe")
                except FleetFailure as err:
                    raise PipelineError(f"vllm_fleet producer: the log-prob probe failed {self.where()}: "
                                        f"{err}") from None
                processed, raw = self.local_logprobs(student, prompt, tokens, temperature, top_p)
                gaps_processed += [min(abs(a - b), 10.0) for a, b in zip(logps, processed, strict=True)]
                gaps_raw += [min(abs(a - b), 10.0) for a, b in zip(logps, raw, strict=True)]
            mean_processed = sum(gaps_processed) / len(gaps_processed)
            mean_raw = sum(gaps_raw) / len(gaps_raw)
            if mean_processed <= PROBE_TOLERANCE:
                continue
            if mean_raw <= PROBE_TOLERANCE:
                raise PipelineError(
                    f"vllm_fleet producer: {server.url} sends raw log-probs (field `logprobs`: they match the "
                    "student's "
                    f"log-softmax before temperature and top-p, off by {mean_processed:.3f} from the distribution it "
                    "samples from); restart it with --logprobs-mode processed_logprobs")
            raise PipelineError(
                f"vllm_fleet producer: {server.url}'s log-probs (field `logprobs`) differ from the local student's by "
                f"{mean_processed:.3f} on average after loading policy version {self.version}: it does not sample with "
                "the student's weights (check --logprobs-mode processed_logprobs, --dtype and that it reads the run "
                "folder)")

    @torch.no_grad()
    def local_logprobs(self, student, prompt: list[int], tokens: list[int], temperature: float,
                       top_p: float) -> tuple[list[float], list[float]]:
        """The local student's log-probs of `tokens` after `prompt`: processed (temperature, top-p) and raw."""
        device = next(student.parameters()).device
        ids = torch.tensor([prompt + tokens[:-1]], device=device)
        was_training = student.training
        student.eval()
        try:
            logits = student(input_ids=ids, use_cache=False).logits[0, len(prompt) - 1:].float()
        finally:
            student.train(was_training)
        index = torch.tensor(tokens, device=device)[:, None]
        processed = sampling_logprobs(logits, temperature, top_p).gather(-1, index).squeeze(-1)
        raw = torch.log_softmax(logits, -1).gather(-1, index).squeeze(-1)
        return processed.tolist(), raw.tolist()

    # ----------------------------------------------------------------------------- jobs
    def submit(self, job: Job) -> None:
        self.raise_failure()
        if job.version != self.version:
            raise PipelineError(f"vllm_fleet producer: job for step {job.step + 1} names policy version {job.version} "
                                f"but the servers hold version {self.version}")
        future = self.jobs_pool.submit(self.run_job, job)
        with self.lock:
            self.futures[job.index] = future
            self.submitted[job.index] = future

    def result(self, index: int, timeout: float) -> Produced:
        with self.lock:
            future = self.futures.pop(index, None)
        if future is None:
            raise PipelineError(f"vllm_fleet producer: no rollouts for job {index} (it was never submitted)")
        try:
            return future.result(timeout=timeout)
        except FutureTimeout:
            self.failure = self.failure or f"job {index} took over {timeout:.0f} s"
            raise PipelineError(f"vllm_fleet producer: waited {timeout:.0f} s for job {index}'s rollouts "
                                f"{self.where()} "
                                "(--model.pipeline.timeout)") from None
        except FleetFailure as err:
            raise PipelineError(f"vllm_fleet producer failed {self.where()}: {err}") from None
        except CancelledError:
            raise PipelineError(f"vllm_fleet producer: job {index} was cancelled (the producer was closed) "
                                f"{self.where()}") from None

    def run_job(self, job: Job) -> Produced:
        try:
            return self.generate(job)
        except FleetFailure as err:
            self.failure = self.failure or str(err)
            self.stop.set()
            raise
        except Exception as err:
            self.failure = self.failure or error_summary(err)
            self.stop.set()
            raise FleetFailure(f"step {job.step + 1}'s rollouts: {error_summary(err)}") from err

    def generate(self, job: Job) -> Produced:
        start = time.perf_counter()
        params, prompts = job.params, job.prompts
        n = params.num_samples
        width = prompts.input_ids.shape[1]
        real = prompts.attention_mask.sum(1).tolist()
        sequences = [row[width - k:] for row, k in zip(prompts.input_ids.tolist(), real, strict=True)]
        seeds = self.row_seeds(job, len(sequences))
        slices = split(len(sequences), len(self.servers))
        used = [(server, rows) for server, rows in zip(self.servers, slices, strict=True) if len(rows)]
        self.check_labels(used, job, "before")
        work = []  # (row, server, prompt, seed), prompt-major then sample
        for server, rows in used:
            for i in rows:
                for j in range(n):
                    work.append((i * n + j, server, sequences[i], seeds[i * n + j]))
        futures = [self.pool.submit(self.row, job, server, prompt, seed) for _, server, prompt, seed in work]
        done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        failed = [f for f in futures if f in done and f.exception() is not None]
        if failed:
            for future in futures:
                future.cancel()
            raise failed[0].exception()
        answers = [None] * len(work)
        for (row, _, _, _), future in zip(work, futures, strict=True):
            answers[row] = future.result()
        self.check_labels(used, job, "after")
        rollout = self.assemble(job, answers)
        seconds = time.perf_counter() - start
        worker = ",".join(server.url for server, _ in used)
        return self.context.finish(Produced(job, rollout, job.version, start, seconds, worker))

    def row_seeds(self, job: Job, prompts: int) -> list[int | None]:
        """One seed per response row: from (prompt seed, sample index) as the engines derive them, else from the
        job's generator seed; None when greedy."""
        params, n = job.params, job.params.num_samples
        if params.greedy:
            return [None] * (prompts * n)
        if params.seeds is not None:
            return [derive_seed(int(seed), j) for seed in params.seeds for j in range(n)]
        generator = torch.Generator().manual_seed(int(job.generator_seed))
        return torch.randint(0, 2**62, (prompts * n,), generator=generator).tolist()

    def check_labels(self, used: list, job: Job, when: str) -> None:
        expected = self.label(job.version)
        labels = self.parallel(self.read_label, [server for server, _ in used])
        for (server, _), held in zip(used, labels, strict=True):
            if held != expected:
                raise FleetFailure(
                    f"{server.url} holds weight version {held!r} (GET /weight_info), not {expected!r} (policy version "
                    f"{job.version}), {when} sampling step {job.step + 1}'s rollouts: another trainer or a restart "
                    "changed its weights; refusing rollouts from weights this fit cannot name")

    def row(self, job: Job, server: Server, prompt: list[int], seed: int | None) -> tuple[list[int], list[float]]:
        if self.stop.is_set():
            raise FleetFailure("stopped")
        params = job.params
        room = (server.max_model_len or 10**9) - len(prompt)
        if room < 1:
            raise FleetFailure(f"{server.url} takes {server.max_model_len} tokens (its --max-model-len) and step "
                               f"{job.step + 1} has a prompt of {len(prompt)}: no room for a response")
        length = min(params.max_new_tokens, room)
        return self.sample(server, job.version, prompt, params.temperature, params.top_p, seed, length,
                           f"step {job.step + 1}'s rollouts")

    def sample(self, server: Server, version: int, prompt: list[int], temperature: float, top_p: float,
               seed: int | None, length: int, what: str) -> tuple[list[int], list[float]]:
        """One response of `prompt` from `server`, validated: (token ids, their sampling log-probs)."""
        model = self.model_for(server, version)
        greedy = temperature == 0
        body = {"model": model, "prompt": prompt, "n": 1, "max_tokens": length, "temperature": float(temperature),
                "top_p": 1.0 if greedy else float(top_p), "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0,
                "presence_penalty": 0.0, "frequency_penalty": 0.0, "logprobs": 0, "return_token_ids": True,
                # EOS is the student tokenizer's, exactly: the server's generation-config stop ids are not used
                "ignore_eos": True, "stop_token_ids": [self.eos], "skip_special_tokens": False}
        if seed is not None:
            body["seed"] = int(seed)
        try:
            reply = server.client.call("POST", "/completions", body).body
        except ServerError as err:
            raise FleetFailure(f"{server.url} refused a completion request for {what} (HTTP {err.status}: "
                               f"{err.message})") from None
        except Unreachable as err:
            reason = (f"did not answer within {self.timeout:g} s (--model.pipeline.timeout)" if "timed out" in str(err)
                      else f"stopped answering ({unreachable_reason(err)})")
            raise FleetFailure(f"{server.url} {reason} while sampling {what}") from None
        return self.validate(server, reply, model, length, what)

    def validate(self, server: Server, reply, model: str, length: int, what: str) -> tuple[list[int], list[float]]:
        """An answer checked like user input; each violation one line naming the server and the field."""
        def bad(field: str, problem: str) -> FleetFailure:
            return FleetFailure(f"{server.url} answered {what} with a bad `{field}`: {problem}; refusing the rollout")

        if not isinstance(reply, dict):
            raise bad("body", f"{str(reply)[:80]!r} is not a JSON object")
        if reply.get("model") != model:
            raise bad("model", f"{reply.get('model')!r}, not {model!r}: sampled with another policy than the job's")
        choices = reply.get("choices")
        if not isinstance(choices, list) or len(choices) != 1 or not isinstance(choices[0], dict):
            count = len(choices) if isinstance(choices, list) else "no"
            raise bad("choices", f"{count} choices for a request of n=1")
        choice = choices[0]
        tokens = choice.get("token_ids")
        if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
            raise bad("choices[0].token_ids", f"{str(tokens)[:80]} is not a list of token ids (the server must take "
                      "return_token_ids: vLLM >= 0.10)")
        if not tokens:
            raise bad("choices[0].token_ids", "no token generated")
        if len(tokens) > length:
            raise bad("choices[0].token_ids", f"{len(tokens)} tokens for max_tokens {length}")
        outside = [t for t in tokens if not 0 <= t < self.vocab]
        if outside:
            raise bad("choices[0].token_ids", f"token id {outside[0]} is outside the student's vocabulary "
                      f"[0, {self.vocab})")
        if self.eos in tokens[:-1]:
            raise bad("choices[0].token_ids", f"tokens after the student's EOS {self.eos}")
        if len(tokens) < length and tokens[-1] != self.eos:
            raise bad("choices[0].token_ids", f"stopped after {len(tokens)} of {length} tokens on token {tokens[-1]}, "
                      f"not the student's EOS {self.eos} (a stop token of the server's generation config? start it "
                      "with --generation-config vllm)")
        logprobs = choice.get("logprobs")
        values = logprobs.get("token_logprobs") if isinstance(logprobs, dict) else None
        if not isinstance(values, list) or len(values) != len(tokens):
            count = len(values) if isinstance(values, list) else "no"
            raise bad("choices[0].logprobs.token_logprobs", f"{count} log-probs for {len(tokens)} tokens")
        out = []
        for value in values:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value > 1e-6 or value <= -9999.0:
                raise bad("choices[0].logprobs.token_logprobs", f"{value!r} (a sampled token's log-probability must be "
                          "finite and <= 0)")
            out.append(min(float(value), 0.0))
        return tokens, out

    def assemble(self, job: Job, answers: list[tuple[list[int], list[float]]]) -> Rollout:
        """The engines' `Rollout`: prompts repeated per sample (prompt-major), responses right-padded with the pad
        id, masks True up to and including EOS, sampling log-probs 0 at padding."""
        prompts, n = job.prompts, job.params.num_samples
        length = max(max(len(tokens) for tokens, _ in answers), 1)
        rows = len(answers)
        response = torch.full((rows, length), self.pad, dtype=torch.long)
        valid = torch.zeros(rows, length, dtype=torch.bool)
        logp = torch.zeros(rows, length, dtype=torch.float32)
        for row, (tokens, values) in enumerate(answers):
            response[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            valid[row, : len(tokens)] = True
            logp[row, : len(values)] = torch.tensor(values, dtype=torch.float32)
        ids = prompts.input_ids.cpu().repeat_interleave(n, 0)
        mask = prompts.attention_mask.cpu().repeat_interleave(n, 0)
        return Rollout(input_ids=torch.cat([ids, response], 1), attention_mask=torch.cat([mask, valid.long()], 1),
                       response_mask=valid, sampling_logp=logp, prompt_len=ids.shape[1],
                       answers=[a for a in prompts.answers for _ in range(n)])

    # ----------------------------------------------------------------------------- plumbing
    def parallel(self, action, servers: list[Server]) -> list:
        """`action(server)` on each server at once; the first failure is raised."""
        futures = [self.pool.submit(action, server) for server in servers]
        return [future.result() for future in futures]

    def where(self) -> str:
        context = getattr(self, "context", None)
        try:
            return context.where() if context is not None else "outside a fit"
        except Exception:  # noqa: BLE001 - a message's detail must not hide the failure
            return "during the fit"

    def raise_failure(self) -> None:
        if self.failure is not None:
            raise PipelineError(f"vllm_fleet producer failed earlier {self.where()}: {self.failure}")

    def close(self) -> None:
        """Stop: queued requests are cancelled, connections cut (a request on the wire ends now), threads end."""
        self.stop.set()
        with self.lock:
            connections = list(self.connections)
            self.connections.clear()
        for conn in connections:
            sock = getattr(conn, "sock", None)
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        for pool in (self.jobs_pool, self.pool):
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)
        self.jobs_pool = self.pool = None
        self.futures, self.submitted = {}, {}


def unreachable_reason(err: Unreachable) -> str:
    """An `Unreachable`'s reason without the URL it starts with (the message names the server already)."""
    text = str(err)
    head, sep, rest = text.partition(": ")
    return rest if sep and head.startswith(("http://", "https://")) else text


def split(count: int, parts: int) -> list[range]:
    """`count` rows in `parts` contiguous slices, the first ones one longer where it does not divide."""
    size, extra = divmod(count, parts)
    out, start = [], 0
    for k in range(parts):
        stop = start + size + (k < extra)
        out.append(range(start, stop))
        start = stop
    return out
