"""opdlab: on-policy distillation of language models with interchangeable token-selection policies.

The public API, kept stable within a minor version and deprecated for a release before it changes
(docs/api.md, CHANGELOG.md):

- `opdlab.selectors`: `TokenSelector`, `FeatureSelector`, `TokenStats`, `normalize_scores`, `apply_budget`,
  `budget_size` and the built-in selectors;
- `opdlab.divergences`: `Divergence`, `LossInputs`, `log_softmax_fp32` and the built-in divergences;
- `opdlab.engines`: `RolloutEngine`, `SamplingParams`, `PromptBatch`, `Rollout`, `sampling_logprobs` and the
  built-in engines;
- `opdlab.tasks`: `PromptSource`, `Problem` and the built-in prompt sources;
- `opdlab.testing`: the contract checks for plugins;
- the `opdlab` command's options and config keys (`opdlab fit --help`).

Every other module and name is internal and may change in any release.
"""

from __future__ import annotations

try:
    from importlib.metadata import PackageNotFoundError, version

    __version__ = version("opdlab")
except PackageNotFoundError:  # running from a checkout that was never installed
    __version__ = "0+unknown"
