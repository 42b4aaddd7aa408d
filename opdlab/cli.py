"""The `opdlab` command: a light dispatcher. Each command imports what it needs when it runs, so
`opdlab --help` and `opdlab plugins` do not pay for Lightning, transformers and the models.

    opdlab fit --config configs/ta_opd.yaml        train (opdlab/fit_cli.py: LightningCLI)
    opdlab fit --config configs/ta_opd.yaml --print_config   show every option with its value
    opdlab eval --config configs/eval/toy.yaml --model toy:add3/student   Avg@k / pass@k on benchmark sets
    opdlab toy --name add3                          rebuild the toy models and compare with the shipped ones
    opdlab plugins                                  list installed selectors, divergences and rollout engines
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from opdlab.console import TRACEBACK_ENV, OpdlabError, error_exit, one_line_parser_class, traceback_wanted  # noqa: F401 (TRACEBACK_ENV: old import path)

PACKAGE_DIR = Path(__file__).resolve().parent


def run_toy(argv: list[str]) -> None:
    from jsonargparse import CLI

    def toy(name: str = "add3", seed: int = 0, cache_dir: str | None = None, force: bool = False) -> None:
        """Build, gate and cache the embedded toy teacher and student, and compare with the shipped build.

        The default toys (add3, spell2, scratch4, mix4; seed 0) ship with opdlab, so `toy:<name>/...` uses those files
        without building. This command rebuilds them into the cache (with one torch thread: faster
        for these tiny models), to check a machine or a changed recipe; the held-out accuracies of both
        builds are printed side by side.

        Args:
            name: which toy: add3 (reversed 3-digit addition, the default), add2 (fast, for tests),
                spell2 (2-digit addition with digit or letter spellings: teacher and student disagree) or
                scratch4 (4-digit addition answered through a 47-token column-by-column scratchpad) or mix4
                (scratch4's task with a teacher that knows the student's spelling: the fair long toy).
            seed: training seed of both models.
            cache_dir: where to cache them (default: $OPDLAB_CACHE/toy, i.e. ~/.cache/opdlab/toy).
            force: rebuild even if a cached build exists.
        """
        import json

        import torch

        from opdlab.toy import build_toy, shipped_toy

        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            path = build_toy(name, cache_dir=cache_dir, seed=seed, force=force)
        finally:
            torch.set_num_threads(threads)
        built = json.loads((path / "build.json").read_text())
        print(f"toy models in {path}")
        shipped = shipped_toy(name, seed)
        reference = json.loads((shipped / "build.json").read_text()) if shipped else None
        for role in ("teacher", "student"):
            line = f"  {role}: held-out accuracy {built[role]['accuracy']:.1%} in {built[role]['steps']} steps"
            if reference:
                line += f" (shipped build: {reference[role]['accuracy']:.1%} in {reference[role]['steps']} steps)"
            print(line)
        if reference:
            print(f"'toy:{name}/...' keeps using the shipped build ({shipped}); pass the directories above as "
                  "--model.student / --model.teacher to train with this one")
        else:
            print(f"use 'toy:{name}/teacher' and 'toy:{name}/student' as model paths")

    CLI(toy, args=argv, prog="opdlab toy", parser_class=one_line_parser_class())


def run_plugins(argv: list[str]) -> None:
    from opdlab import plugins

    if argv and argv[0] in ("-h", "--help"):
        print("usage: opdlab plugins\n\nList every registered selector, divergence and rollout engine with the "
              "package it came from, then every plugin that failed to load and why (exit status 1 if any).")
        return
    rows, broken = [], []
    for group in plugins.GROUPS:
        found, errors = plugins.scan(group)
        rows += [(p.group.split(".")[-1], p.name, p.package, p.class_path) for p in found.values()]
        broken += errors
    if plugins.plugins_disabled():
        print(f"third-party plugins are off ({plugins.DISABLE_ENV}={os.environ[plugins.DISABLE_ENV]}): only opdlab's "
              f"built-ins are listed and loaded; unset {plugins.DISABLE_ENV} to load every installed plugin\n")
    widths = [max(len(r[i]) for r in [("group", "name", "package", "class"), *rows]) for i in range(4)]
    for row in [("group", "name", "package", "class"), *rows]:
        print("  ".join(col.ljust(w) for col, w in zip(row, widths, strict=True)))
    if broken:
        print(f"\n{len(broken)} broken plugin(s), not loaded:")
        for err in broken:
            print(f"  {err}")
        sys.exit(1)


def run_diagnose(argv: list[str]) -> None:
    from opdlab.diagnose import run_diagnose as run

    run(argv)


def run_compare(argv: list[str]) -> None:
    from opdlab.compare import run_compare as run

    run(argv)


def run_eval(argv: list[str]) -> None:
    from opdlab.eval_cli import run_eval as run

    run(argv)


COMMANDS = {"eval": run_eval, "toy": run_toy, "plugins": run_plugins, "diagnose": run_diagnose, "compare": run_compare}
HELP = """usage: opdlab {fit,validate,test,eval,toy,plugins,diagnose,compare} ...

On-policy distillation with token selection (TA-OPD and baselines).

commands:
  fit        train a student by OPD:       opdlab fit --config configs/ta_opd.yaml
  validate   greedy accuracy of a student: opdlab validate --config ... [--ckpt_path ...]
  test       same, on the test split
  eval       sampled accuracy (Avg@k, pass@k, maj@k) on benchmark sets: opdlab eval --config configs/eval/toy.yaml --model ...
  toy        rebuild the toy teacher/student (the default ones ship with opdlab) and compare
  plugins    list installed selectors, divergences and rollout engines
  diagnose   fixed-context diagnostic: does θ0 teachability predict OPD gain? (docs/method.md §3)
  compare    selectors side by side over seeds, plus a budget sweep: opdlab compare --help

`opdlab <command> --help` explains every option of a command; `opdlab --version` prints the version.
"""


def main(argv: list[str] | None = None) -> None:
    """`opdlab ...`: errors that opdlab itself raises (option checks, data, paths, plugins, checkpoints)
    are printed as one `opdlab: error: ...` line; `OPDLAB_TRACEBACK=1` shows the traceback instead.
    Errors raised elsewhere (a bug, a library) keep their traceback, except Lightning's refusals of a Trainer
    option, which are the user's input too."""
    import warnings

    # A plugin importing a public name from its old path: say so (Python hides DeprecationWarnings outside __main__).
    warnings.filterwarnings("default", message=r"opdlab\.\S+ moved to ", category=DeprecationWarning)
    try:
        run_and_report(argv)
    except KeyboardInterrupt:  # Ctrl-C where no command said what it kept (e.g. while models load)
        if traceback_wanted():
            raise
        error_exit("stopped by Ctrl-C", code=130, hint="")
    except Exception as err:
        if type(err).__name__ != "MisconfigurationException" or traceback_wanted():
            raise
        # Lightning's word for a Trainer option it cannot use (devices, accelerator, max_steps ...): the user's input
        error_exit(f"{err} (a --trainer.* option)")


def run_and_report(argv: list[str] | None) -> None:
    """`run`, with opdlab's own errors (and those of classes the CLI builds) as one line."""
    try:
        run(argv)
    except (OpdlabError, ValueError, OSError, KeyError, RuntimeError, ImportError) as err:
        if traceback_wanted():
            raise
        if isinstance(err, OpdlabError):  # opdlab's own word on the user's input, wherever it was raised
            error_exit(err)
        cause = opdlab_cause(err)
        if cause is None:  # older jsonargparse keeps only the text of an error raised in a class it builds
            summary = union_error_summary(str(err))
            if summary is None:
                raise
            error_exit(summary)
        message = cause.args[0] if isinstance(cause, KeyError) and cause.args else cause
        owner = raising_class(cause) if cause is not err else None  # raised inside a class the CLI built
        error_exit(f"{owner + ': ' if owner else ''}{message}")


def union_error_summary(message: str) -> str | None:
    """'<Class>: <reason>' from jsonargparse's "Does not validate against any of the Union subtypes" text
    (the reasons are its "Errors:" lines, the class its "Given value: Namespace(class_path=...)"), or None."""
    import re

    if not message.startswith("Does not validate against any of the Union subtypes"):
        return None
    lines = [line.strip() for line in message.splitlines()]
    reasons = []
    for i, line in enumerate(lines):
        if line.startswith("- ") and not line.startswith("- Expected a <class"):
            follows = lines[i + 1] if i + 1 < len(lines) else ""
            # "- Problem with given class_path '...':" is followed by the reason on its own line
            continued = line.endswith(":") and follows and not follows.startswith(("- ", "Given value"))
            reasons.append(follows if continued else line[2:])
    found = re.search(r"class_path='([\w.]+)'", message)
    if not reasons:
        return None
    return f"{found.group(1).rsplit('.', 1)[-1]}: {reasons[0]}" if found else reasons[0]


def opdlab_cause(err: BaseException) -> BaseException | None:
    """`err`, or the error that directly caused it, raised by opdlab's own code: jsonargparse wraps an error
    raised while it builds a class (a selector, an engine) in its own multi-line one."""
    while err is not None:
        if raised_by_opdlab(err):
            return err
        err = err.__cause__
    return None


def raising_class(err: BaseException) -> str | None:
    """The class whose method raised `err` (its `self`), e.g. the engine whose constructor refused a value."""
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    owner = tb.tb_frame.f_locals.get("self") if tb is not None else None
    return type(owner).__name__ if owner is not None else None


def raised_by_opdlab(err: BaseException) -> bool:
    """True when the innermost frame of the error's traceback is opdlab's own code."""
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and Path(tb.tb_frame.f_code.co_filename).resolve().is_relative_to(PACKAGE_DIR)


def run(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(HELP)
        return
    if argv[0] in ("-V", "--version"):
        from opdlab import __version__

        print(f"opdlab {__version__}")
        return
    if argv[0] in COMMANDS:
        COMMANDS[argv[0]](argv[1:])
        return
    from opdlab.fit_cli import run_fit  # Lightning, transformers and the models: only for these commands

    run_fit(argv)


if __name__ == "__main__":
    main()
