"""The evaluation library: sampled accuracy of a model on benchmark sets, the way papers report it, and the greedy
held-out accuracy training reports. `opdlab eval` (opdlab/eval_cli.py) is its command; `opdlab fit --eval.*` and
`opdlab compare --eval_config` use it too.

One module per concern, in the order an evaluation meets them:

- `options`: `EvalOptions`, `Benchmark`, `EvalError` (what is asked);
- `settings`: the settings files and lists on a command line (`check_config_files`, `replacing_lists`);
- `benchmarks`: `load_benchmark`, `LoadedBenchmark`, `Verifier`, `response_limits`;
- `sources`: which model `--model` names (`resolve_model`, `ModelSource`) and loading it (`load_model`);
- `fingerprints`: models and benchmarks known by content (`model_fingerprint`, `hash_file_into`, ...);
- `outputs`: the output folder (`plan_output`, `read_responses`, `ResponseSink`);
- `sampling`: `evaluate`, which samples, scores, writes and tabulates;
- `tables`: the metrics and the markdown table (`tabulate`, `markdown_table`, `sampling_note`);
- `greedy`: `verified`, `greedy_accuracy` (training's held-out accuracy).

Definitions of the metrics: opdlab/metrics.py and docs/evaluation.md.
"""

from opdlab.evaluation.benchmarks import LoadedBenchmark, Verifier, load_benchmark, response_limits
from opdlab.evaluation.fingerprints import hash_file_into, model_fingerprint
from opdlab.evaluation.greedy import greedy_accuracy, verified
from opdlab.evaluation.options import Benchmark, EvalError, EvalOptions
from opdlab.evaluation.outputs import OutputPlan, ResponseSink, plan_output, read_responses
from opdlab.evaluation.sampling import evaluate
from opdlab.evaluation.settings import check_config_files, replacing_lists
from opdlab.evaluation.sources import ModelSource, load_model, resolve_model
from opdlab.evaluation.tables import markdown_table, run_greedy_accuracy, sampling_note, tabulate

__all__ = [  # the public names (docs/api.md); the rest of each module is internal and may change
    "Benchmark", "EvalError", "EvalOptions", "LoadedBenchmark", "ModelSource", "OutputPlan", "ResponseSink",
    "Verifier", "check_config_files", "evaluate", "greedy_accuracy", "hash_file_into", "load_benchmark",
    "load_model", "markdown_table", "model_fingerprint", "plan_output", "read_responses", "replacing_lists",
    "resolve_model", "response_limits", "run_greedy_accuracy", "sampling_note", "tabulate", "verified",
]
