"""`opdlab eval`: sampled accuracy of a checkpoint on benchmark sets, the way papers report it.

k responses per problem at a temperature / top-p, through a rollout engine (static by default, vllm on a
GPU); per benchmark Avg@k, pass@k' (Chen et al.'s unbiased estimator), maj@k, mean response length, the
fraction cut at max_new_tokens and the fraction with no answer the verifier could read; the equal-weight mean
over benchmarks; mean ± std over evaluation seeds. Every response is appended to `responses.jsonl` as soon as
its batch is scored, so rerunning the same command after a crash continues where it stopped. Stored responses
are reused only for the same model, known by the content of its files (not its path), with the same settings and
benchmark content (eval.json records them); anything else is refused, or replaced with --overwrite, whose old
files stay until the new evaluation has written its first responses.

The evaluation itself is the library opdlab/evaluation/ (also used by `opdlab fit --eval.*` and `opdlab compare`);
this module is the command: it parses, calls the library and prints. Definitions: opdlab/metrics.py and
docs/evaluation.md.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Literal

from opdlab import evaluation
from opdlab._deprecation import moved_names
from opdlab.console import error_exit, one_line_parser_class, signal_name, stop_signals
from opdlab.engines.base import RolloutEngine


def eval_command(
    model: str | None = None,
    benchmarks: list[evaluation.Benchmark] | None = None,
    k: int = 8,
    pass_at: list[int] | None = None,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int | None = None,
    max_prompt_len: int = 2048,
    seeds: list[int] = [0],  # noqa: B006 (jsonargparse reads the default)
    chat_template: bool = False,
    batch_size: int = 32,
    engine: RolloutEngine | None = None,
    dtype: Literal["float32", "bfloat16", "float16"] = "float32",
    device: str = "auto",
    out_dir: str | None = None,
    overwrite: bool = False,
) -> dict:
    """Sampled accuracy of a checkpoint on benchmark sets: Avg@k, pass@k, maj@k, length, cut and unparsed
    responses, per benchmark and as the equal-weight mean (mean ± std over seeds). Rerunning the same command
    continues an interrupted evaluation (only of the same model, by the content of its files, with the same
    settings and benchmark content).

    Args:
        model: what to evaluate: a model directory or exported student, an opdlab run folder (its exported
            student), an opdlab checkpoint (runs/.../checkpoints/last.ckpt), toy:<name>/student, or a hub id.
        benchmarks: the sets, each {name, path, split, prompt_field, answer_field, verifier, prompt_template, limit}
            (see configs/eval/); path `toy:add3` is the toy task's test split.
        k: sampled responses per problem.
        pass_at: the k' of pass@k' (each <= k; default 1, the powers of 2 up to k, and k).
        temperature: sampling temperature (0: greedy, with k=1).
        top_p: nucleus sampling (1: none).
        max_new_tokens: response length limit (default: a toy task's own; required otherwise).
        max_prompt_len: longer prompts keep their last this many tokens, with a warning.
        seeds: evaluation seeds (several: mean ± std over them).
        chat_template: wrap prompts in the tokenizer's chat template.
        batch_size: problems per generation call (each sampled k times).
        engine: the rollout engine: static (default), reference, vllm (pip install -e ".[vllm]"), or a plugin's.
        dtype: weights' dtype (bfloat16 on GPUs for real models).
        device: auto (cuda when there is one), cpu, cuda, cuda:1 ...
        out_dir: where responses.jsonl, result.json and results.md go (default: <run>/eval for a run folder or
            its student/, <run>/eval-<name> for a run's checkpoint, evals/toy_<name>_<role> for a toy,
            evals/<owner>_<name> for a hub id, else evals/<name>-<hash of its path>).
        overwrite: replace what out_dir holds instead of continuing it (the old files stay until the new
            evaluation has its first responses).
    """
    from opdlab.engines.static import StaticCacheEngine
    from opdlab.models import load_tokenizer

    if not model:
        raise evaluation.EvalError("--model is required: a model directory, an opdlab run folder or checkpoint, "
                                   "toy:<name>/student, or a hub id")
    options = evaluation.EvalOptions(list(benchmarks or []), k, pass_at, temperature, top_p, max_new_tokens,
                                     max_prompt_len, list(seeds), chat_template, batch_size)
    options.check()
    if not options.benchmarks:
        raise evaluation.EvalError("no benchmarks given; e.g. --config configs/eval/toy.yaml, or --benchmarks "
                                   "'[{name: add3, path: \"toy:add3\"}]'")
    # Everything that can be checked is, before any weights load and before the output folder changes.
    loaded = [evaluation.load_benchmark(b) for b in options.benchmarks]  # every file is read and checked first
    max_new = evaluation.response_limits(options, loaded)
    source = evaluation.resolve_model(model)
    tokenizer = load_tokenizer(source.tokenizer)
    if options.chat_template:
        evaluation.benchmarks.check_chat_template(tokenizer, source.label, loaded[0].problems[0].prompt)
    device_ = evaluation.sources.pick_device(device)
    engine = engine or StaticCacheEngine()
    out = Path(out_dir) if out_dir is not None else evaluation.sources.default_out_dir(model, source)

    def planned(fingerprint: str) -> evaluation.OutputPlan:
        settings = evaluation.outputs.eval_settings(source.label, fingerprint, engine, options, loaded, max_new, dtype)
        return evaluation.plan_output(out, settings, overwrite, {b.spec.name: b.problems for b in loaded})

    fingerprint = evaluation.model_fingerprint(source)  # None for a hub model not yet in the cache: after it loads
    plan = planned(fingerprint) if fingerprint is not None else None
    print_start(source, loaded, options, out, chosen=out_dir is not None)
    net, _ = evaluation.sources.load_source(source, dtype)
    if plan is None:
        plan = planned(evaluation.model_fingerprint(source) or evaluation.fingerprints.weights_fingerprint(net))
    net.to(device_)
    result = evaluate_until_stopped(net, tokenizer, engine, options, out, source.label, overwrite, loaded, plan)
    print_result(result, source, out)
    return result


def print_start(source: evaluation.ModelSource, loaded: list, options: evaluation.EvalOptions, out: Path,
                chosen: bool) -> None:
    """The line that says what is evaluated on what, and where it goes (stderr)."""
    print(f"opdlab eval: {source.label} on {', '.join(b.spec.name for b in loaded)} "
          f"({sum(len(b.problems) for b in loaded)} problems x {options.k} samples x {len(options.seeds)} seed(s)) "
          f"-> {out}" + ("" if chosen else " (the default for this model; --out_dir to choose)"),
          file=sys.stderr, flush=True)


def evaluate_until_stopped(net, tokenizer, engine: RolloutEngine, options: evaluation.EvalOptions, out: Path,
                           label: str, overwrite: bool, loaded: list, plan: evaluation.OutputPlan) -> dict:
    """`evaluate`; Ctrl-C or SIGTERM keeps what is written and exits printing the command that continues from it."""
    given = sys.argv[2:]  # this command's options, for eval.json and for the line that continues it
    received: list[int] = []  # (a Ctrl-C before the handlers are set is Python's own: reported as Ctrl-C)
    try:
        with stop_signals() as received:
            return evaluation.evaluate(net, tokenizer, engine, options, out, label, overwrite,
                                       command="opdlab eval " + " ".join(given), loaded=loaded, plan=plan)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: what is written stays, and the same command continues from it
        import shlex
        import signal

        signum = received[0] if received else signal.SIGINT
        # without --overwrite: continuing must not replace what this run wrote
        args = [a for i, a in enumerate(given) if not (a.startswith("--overwrite") or
                                                       (i and given[i - 1] == "--overwrite" and not a.startswith("-")))]
        error_exit(f"stopped by {signal_name(signum)}; the responses generated so far are kept in "
                   f"{out / evaluation.outputs.RESPONSES}", prog="opdlab eval", code=128 + signum,
                   hint=f"continue the evaluation with: opdlab eval {shlex.join(args)}")


def print_result(result: dict, source: evaluation.ModelSource, out: Path) -> None:
    """The table, the note on sampled versus greedy accuracy (a run's own greedy accuracy beside it), and where
    the files are."""
    print(evaluation.markdown_table(result, source.label))
    run = Path(source.path) if source.kind != "hub" else None
    run = run.parent if run is not None and run.name == "student" else run
    greedy = evaluation.run_greedy_accuracy(run) if run is not None and run.is_dir() else None
    note = evaluation.sampling_note(result, greedy)
    per = result["seconds_per_response"]
    files = f"responses: {out / evaluation.outputs.RESPONSES}; table: {out / evaluation.outputs.TABLE}"
    print(("\n" + note if note else "") + "\n" + files + (f"; {per * 1000:.1f} ms per sampled response" if per else ""))


def run_eval(argv: list[str]) -> None:
    """`opdlab eval ...`: jsonargparse turns `eval_command`'s signature and docstring into --help."""
    from jsonargparse import CLI

    from opdlab import plugins

    argv = plugins.expand_short_names(argv, {"--engine": "opdlab.rollout_engines"})
    evaluation.check_config_files(argv)
    argv = evaluation.replacing_lists(argv, "--benchmarks")
    CLI(eval_command, args=argv, prog="opdlab eval", parser_class=one_line_parser_class())  # an EvalError: one line


# The library names this module held until opdlab 0.2.0, by their module in opdlab/evaluation/: the old paths work
# until opdlab._deprecation.REMOVED_IN, with a DeprecationWarning naming the new path (the package's own where it
# exports the name).
MOVED = {
    "options": ["EvalError", "Benchmark", "EvalOptions"],
    "settings": ["check_config_files", "json_kind", "replacing_lists", "short"],
    "benchmarks": ["Verifier", "LoadedBenchmark", "load_benchmark", "response_limits", "check_chat_template",
                   "warn_lost_characters"],
    "sources": ["WEIGHT_SUFFIXES", "RUN_MARKERS", "ADAPTER_CONFIG", "ModelSource", "is_run_folder",
                "newest_checkpoints", "has_weights", "adapter_source", "is_model_folder", "resolve_model",
                "read_checkpoint", "load_source", "merged_adapter", "load_model", "pick_device", "default_out_dir"],
    "fingerprints": ["OWN_FILES", "NOT_MODEL_SUFFIXES", "file_sha256", "hash_file_into", "folder_sha256",
                     "hub_revision", "base_fingerprint", "model_fingerprint", "tensors_sha256", "weights_fingerprint",
                     "benchmark_fingerprint"],
    "outputs": ["RESPONSES", "SETTINGS", "RESULT", "TABLE", "PARTIAL", "RECORD_FIELDS", "SETTINGS_FORMAT",
                "NOT_COMPARED", "OutputPlan", "first_difference", "plan_output", "read_responses", "replace_file",
                "ResponseSink", "eval_settings"],
    "sampling": ["evaluate"],
    "tables": ["tabulate", "summary", "METRIC_NAMES", "markdown_table", "sampling_note", "run_greedy_accuracy"],
}
__getattr__ = moved_names(__name__, {
    name: f"opdlab.evaluation{'' if name in evaluation.__all__ else '.' + module}:{name}"
    for module, names in MOVED.items() for name in names})
