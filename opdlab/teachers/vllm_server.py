"""`vllm_server`: the teacher on a vLLM server's OpenAI-compatible API (`--model.teacher http://host:port/v1`).

For every response position it asks `/v1/completions` for the teacher's log-probs at each position of the
unpadded prompt + response ids (`prompt_logprobs`: the top-k and the actual token's, or with -1 the whole
vocabulary; `echo` with no token generated). Start the server with vLLM's own entry point, e.g.

    python -m vllm.entrypoints.openai.api_server --model <teacher> --max-logprobs 20 \
        --middleware starlette.middleware.gzip.GZipMiddleware   # optional: ~5x less JSON

Before training, `connect` checks each server: it answers, serves the model named (`model`), tokenizes like the
student, takes the fit's longest sequences and sends as many log-probs as asked. During training, requests of
`rows_per_request` responses go out `max_concurrency` at a time, each retried `max_retries` times (round-robin
over the servers) before the step fails with one line.
"""

from __future__ import annotations

import math
import re
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

import torch

from opdlab.distributed import rank
from opdlab.rollout import PromptBatch, Rollout
from opdlab.teachers.base import PendingTeacher, TeacherError, TeacherPlacement, is_url
from opdlab.teachers.http import JsonClient, ServerError, Unreachable, split_url, with_retries
from opdlab.teachers.rows import DenseRows, SparseRows, TeacherRows, TopLogprobs
from opdlab.teachers.signal import TeacherSignal

START = "python -m vllm.entrypoints.openai.api_server --model <teacher> --max-logprobs {k}"


class TeacherServerError(TeacherError):
    """A teacher server is unusable (refused before training) or stopped answering (during it)."""


def server_urls(teacher: str) -> list[str]:
    """The URLs of `--model.teacher` (one, or several separated by commas), each checked."""
    urls = [u.strip() for u in teacher.split(",") if u.strip()]
    if not urls:
        raise ValueError(f"teacher {teacher!r} names no server URL; expected e.g. http://127.0.0.1:8000/v1")
    for url in urls:
        split_url(url)
    return urls


class VLLMServerTeacher(TeacherPlacement):
    """The teacher served by vLLM (OpenAI-compatible server); several servers: comma-separated URLs, round-robin.

    Args:
        top_logprobs: log-probs per position: the teacher's top-k (the server needs --max-logprobs >= k; C is
            then a lower bound and D approximated, docs/method.md §2.6), or "full" for its whole vocabulary
            (--max-logprobs -1; exact, but about V numbers per token on the wire).
        model: the model the servers must serve (their served name, or the path or hub id they loaded); null:
            the one model each serves (checked then by its tokenizer only).
        rows_per_request: responses per HTTP request.
        max_concurrency: requests in flight at once, per training process.
        timeout_s: seconds to wait for one answer.
        max_retries: further tries of a request that timed out, found no server or got an HTTP 5xx/429 answer,
            on the next server round-robin; then the step fails, naming it (checkpoints saved so far intact).
        retry_backoff_s: the first wait between tries (doubled each time).
    """

    name = "vllm_server"

    def __init__(self, top_logprobs: int | Literal["full"] = 20, model: str | None = None, rows_per_request: int = 16,
                 max_concurrency: int = 4, timeout_s: float = 120.0, max_retries: int = 3,
                 retry_backoff_s: float = 1.0) -> None:
        if top_logprobs != "full" and not (isinstance(top_logprobs, int) and top_logprobs >= 1):
            raise ValueError(f"top_logprobs must be an integer >= 1 or 'full', got {top_logprobs!r}")
        for name, value, low in (("rows_per_request", rows_per_request, 1), ("max_concurrency", max_concurrency, 1),
                                 ("max_retries", max_retries, 0)):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if not (math.isfinite(timeout_s) and timeout_s > 0) or not (math.isfinite(retry_backoff_s) and retry_backoff_s >= 0):
            raise ValueError(f"timeout_s must be > 0 and retry_backoff_s >= 0 seconds, got {timeout_s} and {retry_backoff_s}")
        self.top_logprobs, self.model = top_logprobs, model
        self.rows_per_request, self.max_concurrency = rows_per_request, max_concurrency
        self.timeout_s, self.max_retries, self.retry_backoff_s = timeout_s, max_retries, retry_backoff_s
        self.clients: list[JsonClient] = []
        self.served: list[str] = []
        self.pool: ThreadPoolExecutor | None = None
        self.stop = threading.Event()  # set by close(): retries and waits end, queued requests are cancelled
        self.server_vocab: int | None = None
        self.counts = {"wire_bytes": 0, "tokens": 0, "requests": 0, "retries": 0, "wait_s": 0.0}
        self.lock = threading.Lock()  # request threads add to `counts`

    # ----------------------------------------------------------------------------- set-up
    @classmethod
    def accepts(cls, teacher: str) -> bool:
        urls = [u for u in teacher.split(",") if u.strip()]
        return bool(urls) and all(is_url(u) for u in urls)

    @classmethod
    def for_needs(cls, need: str) -> VLLMServerTeacher:
        return cls(top_logprobs="full") if need == "full" else cls()

    @property
    def signal(self) -> TeacherSignal:
        return TeacherSignal(top_logprobs=None if self.top_logprobs == "full" else self.top_logprobs)

    @property
    def wire_logprobs(self) -> int:
        return -1 if self.top_logprobs == "full" else self.top_logprobs

    def check_spec(self, teacher: str) -> None:
        try:
            server_urls(teacher)
        except ValueError as err:
            raise ValueError(f"the vllm_server teacher placement needs --model.teacher to be the server's URL "
                             f"(e.g. http://127.0.0.1:8000/v1): {err}") from None

    def connect(self, teacher: str, tokenizer, max_sequence_len: int) -> None:
        if self.top_logprobs != "full" and self.top_logprobs >= len(tokenizer):  # e.g. the default 20 on a toy
            warnings.warn(f"top_logprobs={self.top_logprobs} covers the student's whole vocabulary ({len(tokenizer)} "
                          "tokens): asking the server for all of it (exact, as top_logprobs full)", stacklevel=2)
            self.top_logprobs = "full"
        self.clients = [JsonClient(url, self.timeout_s) for url in server_urls(teacher)]
        self.eos, self.pad = tokenizer.eos_token_id, tokenizer.pad_token_id
        self.served = [self.check_server(client, tokenizer, max_sequence_len) for client in self.clients]
        if len(set(self.served)) > 1:
            raise TeacherServerError(f"the teacher servers serve different models ({', '.join(self.served)}); "
                                     "every server in --model.teacher must serve the same teacher")

    def check_server(self, client: JsonClient, tokenizer, max_sequence_len: int) -> str:
        """Identity and limits of one server; returns the name it serves the teacher under."""
        k = "-1" if self.top_logprobs == "full" else self.top_logprobs
        try:
            reply = client.call("GET", "/models")
        except Unreachable as err:
            raise TeacherServerError(f"no teacher server answers at {client.base} ({err}); start one ({START.format(k=k)} "
                                     "--host ... --port ...) or correct --model.teacher") from None
        except ServerError as err:
            raise TeacherServerError(f"{client.base} is not an OpenAI-compatible server (GET {err.url} answered HTTP "
                                     f"{err.status}); vLLM's URL ends in /v1, e.g. http://127.0.0.1:8000/v1") from None
        served = reply.body.get("data") if isinstance(reply.body, dict) else None
        if not isinstance(served, list) or not served or not all(isinstance(m, dict) and "id" in m for m in served):
            raise TeacherServerError(f"{client.base}/models lists no model; is it an OpenAI-compatible server?")
        chosen = self.pick_model(served, client.base)
        limit = chosen.get("max_model_len")
        if isinstance(limit, int) and limit < max_sequence_len:
            raise TeacherServerError(
                f"the teacher server {client.base} takes sequences of at most {limit} tokens (its --max-model-len), and "
                f"this fit can send {max_sequence_len} (prompt + response); restart it with --max-model-len "
                f"{max_sequence_len} or lower --model.rollout.max_prompt_len / max_new_tokens")
        self.check_tokenizer(client, chosen["id"], tokenizer)
        self.check_logprobs(client, chosen["id"], tokenizer)
        return chosen["id"]

    def pick_model(self, served: list[dict], base: str) -> dict:
        listing = ", ".join(f"{m['id']}" + (f" (loaded from {m['root']})" if m.get("root") not in (None, m["id"]) else "")
                            for m in served)
        if self.model is None:
            if len(served) > 1:
                raise TeacherServerError(f"the teacher server {base} serves {len(served)} models ({listing}); name the "
                                         "teacher with --model.teacher_placement.model")
            return served[0]
        wanted = same_model_keys(self.model)
        for m in served:
            if wanted & (same_model_keys(m["id"]) | same_model_keys(m.get("root"))):
                return m
        raise TeacherServerError(f"the teacher server {base} serves {listing}, not {self.model!r}; point "
                                 "--model.teacher at the server of that model, or correct --model.teacher_placement.model")

    def check_tokenizer(self, client: JsonClient, name: str, tokenizer) -> None:
        """The server tokenizes a probe text (a spread of the student's vocabulary and its special tokens) into the
        ids the student's tokenizer gives, and has no token past the student's last id (a larger vocabulary whose
        first ids agree)."""
        size = len(tokenizer)
        ids = sorted({int(i) for i in torch.linspace(0, size - 1, min(size, 64)).round().tolist()})
        text = tokenizer.decode(ids) + "".join(t for t in (tokenizer.eos_token, tokenizer.bos_token) if t)
        expected = tokenizer(text, add_special_tokens=False)["input_ids"]
        try:
            got = client.call("POST", "/tokenize", {"model": name, "prompt": text, "add_special_tokens": False},
                              root=True).body.get("tokens")
        except (ServerError, Unreachable, AttributeError) as err:
            warnings.warn(f"could not check the tokenizer of the teacher server {client.base} (POST /tokenize: {err}); "
                          "make sure it serves a model of the student's family", stacklevel=2)
            return
        if got == expected:
            self.check_no_extra_tokens(client, name, size)
            return
        at = next((i for i, (a, b) in enumerate(zip(expected, got or [])) if a != b), min(len(expected), len(got or [])))
        raise TeacherServerError(
            f"the teacher server {client.base} ({name}) tokenizes differently from the student's tokenizer: a probe "
            f"text gives {expected[at:at + 4]} for the student and {(got or [])[at:at + 4]} on the server at token "
            f"{at}; token-level distillation needs one shared tokenizer: serve a teacher of the student's family")

    def check_no_extra_tokens(self, client: JsonClient, name: str, size: int) -> None:
        try:
            extra = client.call("POST", "/detokenize", {"model": name, "tokens": [size]}, root=True).body.get("prompt")
        except (ServerError, Unreachable, AttributeError):
            return  # refused: the server's tokenizer has no such id either
        if extra:
            raise TeacherServerError(
                f"the teacher server {client.base} ({name}) has a larger vocabulary than the student's tokenizer "
                f"({size} tokens): its token {size} is {extra!r}; token-level distillation needs one shared tokenizer: "
                "serve a teacher of the student's family")

    def check_logprobs(self, client: JsonClient, name: str, tokenizer) -> None:
        """One request for the log-probs of a two-token sequence: refused or incomplete answers are said here."""
        probe = [tokenizer.eos_token_id, tokenizer.eos_token_id]
        try:
            choice = self.post_logprobs(client, name, [probe])[0][0]
        except ServerError as err:
            allowed = re.search(r"max allowed:?\s*(-?\d+)", err.message)
            if "logprob" in err.message.lower() and allowed:
                raise TeacherServerError(
                    f"the teacher server {client.base} sends at most {allowed.group(1)} log-probs per position (its "
                    f"--max-logprobs) and top_logprobs={self.top_logprobs} asks for more; restart it with --max-logprobs "
                    f"{self.wire_logprobs} (-1: the whole vocabulary) or lower --model.teacher_placement.top_logprobs") from None
            raise TeacherServerError(f"the teacher server {client.base} refused a log-prob request: {err.message}") from None
        except Unreachable as err:
            raise TeacherServerError(f"the teacher server {client.base} did not answer a log-prob request ({err})") from None
        entries = choice.get("prompt_logprobs") if isinstance(choice, dict) else None
        if not isinstance(entries, list) or len(entries) < 2 or not isinstance(entries[1], dict):
            raise TeacherServerError(f"the teacher server {client.base} returned no prompt log-probs; opdlab needs vLLM's "
                                     "`prompt_logprobs` (an OpenAI-compatible server of another kind, or an old vLLM?)")
        if self.top_logprobs == "full":
            self.server_vocab = len(entries[1])

    def load(self, student, tokenizer, options) -> None:
        rows = student.get_output_embeddings().weight.shape[0]
        if rows < len(tokenizer):
            raise ValueError(f"the student's output size ({rows}) is smaller than the tokenizer ({len(tokenizer)} tokens)")
        if self.server_vocab is not None and self.server_vocab < len(tokenizer):
            raise TeacherServerError(f"the teacher server sends {self.server_vocab} log-probs for the whole vocabulary, and "
                                     f"the student's tokenizer has {len(tokenizer)} tokens: it serves another vocabulary")
        self.columns = rows if self.server_vocab is None else min(rows, self.server_vocab)
        return None

    def vocab_columns(self, student, tokenizer) -> int:
        return min(self.columns, student.get_output_embeddings().weight.shape[0])

    # ----------------------------------------------------------------------------- requests
    def post_logprobs(self, client: JsonClient, name: str, sequences: list[list[int]]) -> tuple[list[dict], int]:
        body = {"model": name, "prompt": sequences, "max_tokens": 0, "echo": True, "temperature": 1.0,
                "prompt_logprobs": self.wire_logprobs}
        reply = client.call("POST", "/completions", body)
        choices = reply.body.get("choices") if isinstance(reply.body, dict) else None
        if not isinstance(choices, list) or len(choices) != len(sequences):
            raise Unreachable(f"{client.base}/completions answered {len(choices or [])} choices for {len(sequences)} prompts")
        return sorted(choices, key=lambda c: c.get("index", 0)), reply.wire_bytes

    def request(self, rollout: Rollout) -> ServedPending:
        if not self.clients:
            raise RuntimeError("the vllm_server teacher is not connected (connect() was not called)")
        if self.pool is None:  # first request, or the first after close()
            self.stop.clear()
            self.pool = ThreadPoolExecutor(self.max_concurrency, thread_name_prefix="opdlab-teacher")
        p = rollout.prompt_len
        real = rollout.attention_mask[:, :p].sum(1).tolist()
        lengths = rollout.response_mask.sum(1).tolist()
        ids = rollout.input_ids.tolist()
        work = [(i, ids[i][p - real[i] : p + lengths[i]], real[i]) for i in range(len(ids)) if lengths[i] > 0]
        groups = [work[s : s + self.rows_per_request] for s in range(0, len(work), self.rows_per_request)]
        start = rank()
        futures = [self.pool.submit(self.fetch, group, start + j) for j, group in enumerate(groups)]
        return ServedPending(self, rollout.response_mask.shape, futures, rollout.input_ids.device)

    def close(self) -> None:
        """Stop retries and waits, cancel the requests not yet sent, and let the threads end (a request already on
        the wire ends within its timeout_s, and is not retried)."""
        self.stop.set()
        pool, self.pool = self.pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)

    def fetch(self, group: list[tuple[int, list[int], int]], start: int) -> list[tuple[int, object]]:
        """One request's rows, parsed: [(row, per-position teacher data)]."""
        name = self.served[0]
        try:
            (choices, wire), retries = with_retries(lambda c: self.post_logprobs(c, name, [g[1] for g in group]),
                                                    self.clients, start, self.max_retries, self.retry_backoff_s,
                                                    self.stop)
        except (ServerError, Unreachable) as err:
            if isinstance(err, ServerError) and not err.retryable:
                raise TeacherServerError(f"the teacher server refused a request ({err})") from None
            raise TeacherServerError(f"the teacher server stopped answering: {err} (after {self.max_retries} retries "
                                     f"on {len(self.clients)} server(s))") from None
        parsed = []
        for (row, seq, prompt_len), choice in zip(group, choices, strict=True):
            entries = choice.get("prompt_logprobs") or []
            positions = entries[prompt_len : len(seq)]
            if len(positions) != len(seq) - prompt_len or any(not isinstance(e, dict) for e in positions):
                raise TeacherServerError(f"the teacher server returned {len(positions)} prompt log-prob entries for a "
                                         f"response of {len(seq) - prompt_len} tokens")
            tokens = seq[prompt_len:]
            parse = self.parse_full if self.top_logprobs == "full" else self.parse_top
            parsed.append((row, parse(positions, tokens)))
        self.count(wire_bytes=wire, requests=1, retries=retries, tokens=sum(len(g[1]) - g[2] for g in group))
        return parsed

    def count(self, **amounts) -> None:
        with self.lock:
            for key, amount in amounts.items():
                self.counts[key] += amount

    def parse_top(self, positions: list[dict], tokens: list[int]) -> tuple[list, list, list]:
        """(ids, logp, known), each n lists of k + 1: the top-k by log-prob, then the sampled token if not among them."""
        k = self.top_logprobs
        ids, logp, known = [], [], []  # Python lists, one tensor each at the end (per-element writes are slow)
        for entry, token in zip(positions, tokens, strict=True):
            items = sorted(((int(key), float(v["logprob"])) for key, v in entry.items()), key=lambda x: -x[1])
            sampled = next((lp for i, lp in items if i == token), None)
            if sampled is None:
                raise TeacherServerError(f"the teacher server's log-probs lack the actual token {token} at a response "
                                         "position; is it serving the student's tokenizer?")
            top, extra = items[:k], (0, -math.inf)
            if len(items) > k:  # vLLM adds the actual token to its top-k when it is not among them
                top, extra = [x for x in items if x[0] != token][:k], (token, sampled)
            top = top + [(0, -math.inf)] * (k - len(top)) + [extra]
            ids.append([i for i, _ in top])
            logp.append([lp for _, lp in top])
            known.append([lp > -math.inf and i < self.columns for i, lp in top])
        return ids, logp, known  # plain lists: tensors are made in the training thread (`ServedPending.lay_out`)

    def parse_full(self, positions: list[dict], tokens: list[int]) -> list[tuple[list[int], list[float]]]:
        """Per position (ids, log-probs) of the whole vocabulary, as lists (laid out in `ServedPending.lay_out`)."""
        return [([int(key) for key in entry], [float(v["logprob"]) for v in entry.values()]) for entry in positions]

    def generate(self, prompts: PromptBatch, max_new_tokens: int, sync_ranks: bool = False) -> Rollout:
        """Greedy responses from the server (temperature 0, stopping at EOS), as a Rollout."""
        real = prompts.attention_mask.sum(1).tolist()
        width = prompts.input_ids.shape[1]
        sequences = [row[width - n :] for row, n in zip(prompts.input_ids.tolist(), real, strict=True)]
        body = {"model": self.served[0], "max_tokens": max_new_tokens, "temperature": 0.0, "return_token_ids": True}
        outputs = []
        for s in range(0, len(sequences), self.rows_per_request):
            part = sequences[s : s + self.rows_per_request]
            try:
                reply, _ = with_retries(lambda c, part=part: c.call("POST", "/completions", {**body, "prompt": part}),
                                        self.clients, rank(), self.max_retries, self.retry_backoff_s, self.stop)
            except (ServerError, Unreachable) as err:
                raise TeacherServerError(f"the teacher server failed to generate: {err}") from None
            outputs += [c.get("token_ids") or [] for c in sorted(reply.body["choices"], key=lambda c: c.get("index", 0))]
        return greedy_rollout(prompts, outputs, self.eos, self.pad)

    def step_metrics(self) -> dict[str, float]:
        with self.lock:
            counts, self.counts = self.counts, {key: 0 for key in self.counts}
        tokens = max(counts["tokens"], 1)
        return {"teacher/wire_bytes_per_token": counts["wire_bytes"] / tokens, "teacher/wait_s": counts["wait_s"],
                "teacher/retries": float(counts["retries"]), "teacher/requests": float(counts["requests"])}

    def describe(self) -> str:
        urls = ", ".join(c.base for c in self.clients)
        return f"teacher: {self.served[0] if self.served else '?'} on vLLM server(s) {urls}; {self.signal.describe()}"

    def __getstate__(self) -> dict:  # connections and threads do not travel (deepcopy, spawn)
        return {**self.__dict__, "clients": [], "pool": None, "lock": None, "stop": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, lock=threading.Lock(), stop=threading.Event())


class ServedPending(PendingTeacher):
    """A rollout's requests in flight; `rows` waits for them (once) and lays the answers on the (N, L) grid, on
    the rollout's device."""

    def __init__(self, teacher: VLLMServerTeacher, shape: torch.Size, futures: list, device: torch.device) -> None:
        self.teacher, self.shape, self.futures, self.device = teacher, tuple(shape), futures, device
        self.grid: TeacherRows | None = None

    def rows(self, rows: slice) -> TeacherRows:
        if self.grid is None:
            started = time.perf_counter()
            parsed = self.answers()
            self.teacher.count(wait_s=time.perf_counter() - started)
            self.grid = self.lay_out(parsed).to(self.device)
        length = self.shape[1]
        return self.grid[slice(rows.start * length, rows.stop * length)]

    def answers(self) -> list[tuple[int, object]]:
        """Every request's parsed rows; the first failure cancels the requests not yet sent and stops the
        retries of the others before it is raised (the step ends without waiting them out)."""
        try:
            return [item for future in self.futures for item in future.result()]
        except BaseException:
            for future in self.futures:
                future.cancel()
            self.teacher.stop.set()
            raise

    def lay_out(self, parsed: list[tuple[int, object]]) -> TeacherRows:
        """The answers as (N · L, ...) CPU tensors (filled element by element), zero (unknown) at the positions no
        answer covers; `rows` moves them to the rollout's device in one copy each."""
        n, length = self.shape
        teacher = self.teacher
        if teacher.top_logprobs == "full":
            logp = torch.zeros(n * length, teacher.columns)
            for row, positions in parsed:
                block = logp[row * length : row * length + len(positions)].fill_(-math.inf)
                for t, (ids, values) in enumerate(positions):
                    index, value = torch.tensor(ids, dtype=torch.long), torch.tensor(values)
                    keep = index < teacher.columns
                    block[t, index[keep]] = value[keep]
            return DenseRows(logp)
        width = teacher.top_logprobs + 1
        ids = torch.zeros(n * length, width, dtype=torch.long)
        logp = torch.full((n * length, width), -math.inf)
        known = torch.zeros(n * length, width, dtype=torch.bool)
        for row, (i, lp, kn) in parsed:
            span = slice(row * length, row * length + len(i))
            ids[span], logp[span] = torch.tensor(i, dtype=torch.long), torch.tensor(lp)
            known[span] = torch.tensor(kn, dtype=torch.bool)
        return SparseRows(TopLogprobs(ids, logp, known, teacher.top_logprobs, teacher.columns))


def same_model_keys(name: str | None) -> set[str]:
    """The ways a model can be named: as given, a `toy:` name's directory, a local path resolved."""
    if not name:
        return set()
    keys = {name}
    if name.startswith("toy:"):
        from opdlab.models import resolve_model_path

        try:
            name = resolve_model_path(name)
        except (OSError, ValueError, KeyError):
            return keys
    path = Path(name).expanduser()
    if path.exists():
        keys.add(str(path.resolve()))
    return keys


def greedy_rollout(prompts: PromptBatch, outputs: list[list[int]], eos: int, pad: int) -> Rollout:
    """A Rollout from generated token ids (cut after the first EOS), padded to the longest, on the prompts' device."""
    cut = [out[: out.index(eos) + 1] if eos in out else out for out in outputs]
    length = max((len(c) for c in cut), default=0) or 1
    device = prompts.input_ids.device
    response = torch.full((len(cut), length), pad, dtype=torch.long, device=device)
    mask = torch.zeros(len(cut), length, dtype=torch.bool, device=device)
    for i, c in enumerate(cut):
        response[i, : len(c)] = torch.tensor(c, dtype=torch.long)
        mask[i, : len(c)] = True
    return Rollout(input_ids=torch.cat([prompts.input_ids, response], 1),
                   attention_mask=torch.cat([prompts.attention_mask, mask.long()], 1), response_mask=mask,
                   sampling_logp=torch.zeros(len(cut), length, device=device), prompt_len=prompts.input_ids.shape[1],
                   answers=list(prompts.answers))
