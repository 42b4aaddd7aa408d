"""`evaluate`: k sampled responses per problem through a rollout engine, each scored by its benchmark's verifier
and appended to responses.jsonl as soon as its batch is (so an evaluation that stops continues where it
stopped), then tabulated into result.json and results.md."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

from opdlab.evaluation.benchmarks import (
    LoadedBenchmark,
    check_chat_template,
    load_benchmark,
    response_limits,
    warn_lost_characters,
)
from opdlab.evaluation.fingerprints import model_fingerprint, weights_fingerprint
from opdlab.evaluation.options import EvalOptions
from opdlab.evaluation.outputs import RESULT, TABLE, OutputPlan, ResponseSink, eval_settings, plan_output, replace_file
from opdlab.evaluation.sources import is_model_folder, resolve_model
from opdlab.evaluation.tables import markdown_table, tabulate
from opdlab.progress import Progress

if TYPE_CHECKING:
    from opdlab.engines.base import RolloutEngine


def evaluate(model, tokenizer, engine: RolloutEngine, options: EvalOptions, out_dir: str | Path, label: str,
             overwrite: bool = False, command: str | None = None, loaded: list[LoadedBenchmark] | None = None,
             plan: OutputPlan | None = None, fingerprint: str | None = None) -> dict:
    """Sample, score and tabulate `model` (already on its device) on `options.benchmarks`; writes responses.jsonl,
    result.json and results.md into `out_dir` and returns the result. Resumes what `out_dir` already holds when
    it was made by the same model (by content) with the same settings. `plan`: `plan_output`'s, when the caller
    checked the folder before loading the model; `fingerprint`: the model's (default: of the folder `label`
    names, else of the weights in memory)."""
    pass_ks = options.check()
    loaded = loaded if loaded is not None else [load_benchmark(b) for b in options.benchmarks]
    max_new = response_limits(options, loaded)
    if options.chat_template:
        check_chat_template(tokenizer, label, loaded[0].problems[0].prompt)
    warn_lost_characters(tokenizer, label, loaded)
    if plan is None:
        if fingerprint is None:
            folder = Path(label)
            fingerprint = (model_fingerprint(resolve_model(label))
                           if folder.is_dir() and is_model_folder(folder) else weights_fingerprint(model))
        dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        settings = eval_settings(label, fingerprint, engine, options, loaded, max_new, dtype)
        plan = plan_output(out_dir, settings, overwrite, {b.spec.name: b.problems for b in loaded})
    model.eval()
    engine.bind(model, tokenizer.eos_token_id, tokenizer.pad_token_id)
    engine.load_weights(model)
    generated, seconds = sample_missing(tokenizer, engine, options, loaded, max_new, plan)
    result = tabulate(plan.done, loaded, options, pass_ks)
    result.update(settings=plan.settings, command=command, generated_now=generated,
                  seconds_per_response=(seconds / generated) if generated else None)
    replace_file(plan.out_dir / RESULT, json.dumps(result, indent=2))
    replace_file(plan.out_dir / TABLE, markdown_table(result, label) + "\n")
    return result


def sample_missing(tokenizer, engine: RolloutEngine, options: EvalOptions, loaded: list[LoadedBenchmark],
                   max_new: dict[str, int], plan: OutputPlan) -> tuple[int, float]:
    """Sample and score every problem (per seed) `plan.done` lacks, in batches, each written to the output folder
    and added to `plan.done` as it is scored; (responses generated, seconds spent generating them)."""
    done = plan.done
    total = len(options.seeds) * sum(len(b.problems) for b in loaded)
    progress = Progress(total, sum(1 for key in done if key[0] in options.seeds), "opdlab eval")
    generated, seconds = 0, 0.0
    sink = ResponseSink(plan)
    try:
        for seed in options.seeds:
            for bench in loaded:
                name = bench.spec.name
                todo = [i for i in range(len(bench.problems)) if (seed, name, i) not in done]
                for start in range(0, len(todo), options.batch_size):
                    indices = todo[start : start + options.batch_size]
                    records, took = sample_batch(tokenizer, engine, options, bench, indices, seed, max_new[name])
                    seconds += took
                    generated += len(indices) * options.k
                    sink.write(records)
                    for record in records:
                        done.setdefault((seed, name, record["index"]), []).append(record)
                    progress.update(len(indices), f"{name} seed {seed}")
    finally:
        progress.close()
        sink.close()
    return generated, seconds


def sample_batch(tokenizer, engine: RolloutEngine, options: EvalOptions, bench: LoadedBenchmark,
                 indices: list[int], seed: int, max_new_tokens: int) -> tuple[list[dict], float]:
    """The k scored response records of each of `bench`'s problems `indices` (one generate call), and the
    seconds generating took."""
    import torch

    from opdlab.engines.base import SamplingParams
    from opdlab.rollout import derive_seed, encode_prompts

    name, chunk = bench.spec.name, [bench.problems[i] for i in indices]
    prompts = encode_prompts(tokenizer, [p.prompt for p in chunk], [p.answer for p in chunk],
                             max_prompt_len=options.max_prompt_len, chat_template=options.chat_template)
    params = SamplingParams(num_samples=options.k, max_new_tokens=max_new_tokens, temperature=options.temperature,
                            top_p=options.top_p, seeds=[derive_seed(seed, name, i) for i in indices])
    began = time.perf_counter()
    with torch.no_grad():
        rollout = engine.generate(prompts, params)
    seconds = time.perf_counter() - began
    return scored_records(tokenizer, rollout, bench, indices, seed, options.k), seconds


def scored_records(tokenizer, rollout, bench: LoadedBenchmark, indices: list[int], seed: int, k: int) -> list[dict]:
    """One record per response of `rollout` (k per problem of `indices`, in order): the response, whether its
    benchmark's verifier finds it correct, its answer key, its length and whether max_new_tokens cut it."""
    from opdlab.rollout import decode_responses

    texts = decode_responses(tokenizer, rollout)
    mask = rollout.response_mask.cpu()
    ended = ((rollout.response_ids.cpu() == tokenizer.eos_token_id) & mask).any(dim=1)
    records = []
    for row, text in enumerate(texts):
        p, j = divmod(row, k)
        problem = bench.problems[indices[p]]
        correct, key = bench.verifier.check(text, problem.answer)
        records.append({"seed": seed, "benchmark": bench.spec.name, "index": indices[p], "sample": j,
                        "prompt": problem.prompt, "answer": problem.answer, "response": text,
                        "correct": correct, "key": key, "length": int(mask[row].sum()),
                        "truncated": not bool(ended[row])})
    return records
