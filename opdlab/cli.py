"""The `opdlab` command: fit / validate / test (LightningCLI), plus toy and plugins.

    opdlab fit --config configs/ta_opd.yaml        train (builds the toy models on first use)
    opdlab fit --config configs/ta_opd.yaml --print_config   show every option with its value
    opdlab toy --name add3                          build and cache the embedded toy models
    opdlab plugins                                  list installed selectors and divergences
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from pathlib import Path

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from opdlab import plugins
from opdlab.callbacks import SelectionMetrics
from opdlab.compare import run_compare
from opdlab.data import PromptDataModule
from opdlab.diagnose import run_diagnose
from opdlab.module import OPDModule

TRAINER_DEFAULTS = {
    "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger", "init_args": {"save_dir": "runs", "name": "opdlab"}},
    "num_sanity_val_steps": 0,
    "inference_mode": False,  # metrics and caches made in validation are reused in training
    "max_steps": 200,
    "plugins": [{"class_path": "opdlab.checkpointing.AtomicCheckpointIO"}],
}
SHORT_NAME_ARGS = {"--model.selector": "opdlab.selectors", "--model.divergence": "opdlab.divergences",
                   "--model.rollout_engine": "opdlab.rollout_engines"}


class OPDLabArgumentParser(LightningArgumentParser):
    """Adds "did you mean" to errors about unknown options or config keys (typos)."""

    def error(self, message: str, ex: Exception | None = None):
        """One line with the closest known keys, instead of the whole usage (hundreds of options) first."""
        if os.environ.get(TRACEBACK_ENV, "").strip() not in ("", "0"):
            return super().error(message + closest_keys_hint(message, self), ex)
        first = message.strip().splitlines()[0] if message.strip() else message
        prog = self.prog.replace(" [options]", "")
        sys.stderr.write(f"{prog}: error: {first}{closest_keys_hint(message, self)}\n"
                         f"run '{prog} --help' for every option\n")
        sys.exit(2)


def closest_keys_hint(message: str, parser) -> str:
    """' Did you mean ...?' for the unknown keys named in a jsonargparse error message, else ''."""
    import difflib
    import re

    unknown = re.findall(r"--([\w.]+)", message.partition("unrecognized arguments:")[2])
    for group, option in re.findall(r"Group '([\w.]+)' does not accept option '([\w]+)", message):
        unknown.append(f"{group}.{option}")
    unknown += re.findall(r"Key '([\w.]+)' is not expected", message)
    known = sorted(set(option_keys(parser)))
    hints = []
    for key in unknown:
        close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
        if close:
            hints.append(f"'{key}': did you mean {' or '.join(repr(c) for c in close)}?")
    return ("\n" + "\n".join(hints)) if hints else ""


def option_keys(parser) -> list[str]:
    """Every option key of a parser and of its subcommands' parsers (fit, validate, ...)."""
    keys = []
    for action in parser._actions:
        for sub in (getattr(action, "choices", None) or {}).values() if hasattr(action, "_name_parser_map") else ():
            keys += option_keys(sub)
        if action.dest and action.dest not in ("help", "config") and not action.dest.endswith(".help") \
                and not hasattr(action, "_name_parser_map"):
            keys.append(action.dest)
    return keys


class OPDLabCLI(LightningCLI):
    """LightningCLI over `OPDModule` and `PromptDataModule`; `fit` also reports accuracy before/after."""

    def add_arguments_to_parser(self, parser) -> None:
        from opdlab.callbacks import TeachabilityHistograms

        # Always-on callbacks, configurable under their own top-level keys
        # (e.g. `--teachability_histograms.every_n_steps 10`). TokenBank is opt-in via trainer.callbacks.
        parser.add_lightning_class_args(SelectionMetrics, "selection_metrics")
        parser.add_lightning_class_args(TeachabilityHistograms, "teachability_histograms")

    def parse_arguments(self, parser, args) -> None:
        super().parse_arguments(parser, args)
        self.check_resume_options()

    def _parse_ckpt_path(self) -> None:
        """Off: Lightning >= 2.5.6 lays the checkpoint's saved hyperparameters over the command line here,
        silently dropping options given there (while selector, divergence and optimizer, which are not
        saved, follow the command line: a mixed run). See `check_resume_options` for opdlab's rule."""

    def check_resume_options(self) -> None:
        """Resuming (`--ckpt_path`): the student and the teacher must be the ones the checkpoint was trained
        with (refused otherwise); every other option is taken from this command line and config, and each
        one that differs from the checkpoint's value gets a warning."""
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if not ckpt_path or not Path(ckpt_path).is_file():
            return
        try:
            import torch

            saved = torch.load(ckpt_path, weights_only=True, map_location="cpu").get("hyper_parameters", {})
        except Exception:  # noqa: BLE001 - an unreadable file is reported clearly when the run loads it
            return
        given = self.config[subcommand]["model"]
        for key in ("student", "teacher"):
            if key in saved and saved[key] != given.get(key):
                sys.exit(f"opdlab: error: --ckpt_path {ckpt_path} was trained with model.{key}={saved[key]!r}, "
                         f"but this run names {given.get(key)!r}; resume with the same {key} (or start a new run "
                         "without --ckpt_path)")
        for key, value in saved.items():
            if key in given and key not in ("student", "teacher") and given[key] != value:
                warnings.warn(f"resuming from {ckpt_path} with model.{key}={given[key]!r} (the checkpoint was "
                              f"trained with {value!r})", stacklevel=1)

    def before_fit(self) -> None:
        self.accuracy_before = self._validate()  # builds the models first (and, on first use, the toy)
        self.fit_started = time.perf_counter()  # so the summary's time and tokens/s are the training's

    def after_fit(self) -> None:
        seconds = time.perf_counter() - self.fit_started
        model, trainer = self.model, self.trainer
        after = self._validate() if model.last_val_step != trainer.global_step else model.last_val_accuracy
        export = Path(trainer.log_dir or "runs") / "student"  # log_dir and export are collectives
        model.export_student(str(export))
        if trainer.is_global_zero:
            teacher = model.teacher_val_accuracy
            lines = [
                f"steps: {trainer.global_step}   training wall time: {seconds:.1f} s   "
                f"response tokens/s: {model.response_tokens / max(seconds, 1e-9):.0f}",
                f"student accuracy: before {self.accuracy_before:.1%} -> after {after:.1%}"
                + (f"   (teacher {float(teacher):.1%})" if teacher is not None else ""),
                f"student exported to {export}",
            ]
            print("\n".join(["", "opdlab fit summary", *lines]))

    def _validate(self) -> float:
        self.trainer.validate(self.model, datamodule=self.datamodule, verbose=False)
        return self.model.last_val_accuracy


def expand_short_names(argv: list[str]) -> list[str]:
    """Turn registered plugin names (`--model.selector teachability`) into class paths."""
    out = list(argv)
    for i, arg in enumerate(out):
        key, eq, value = arg.partition("=")
        if key not in SHORT_NAME_ARGS:
            continue
        if not eq:
            if i + 1 >= len(out):
                continue
            value = out[i + 1]
        if "." in value or value.startswith(("{", "[")) or value[:1].isupper():
            continue  # a class path, a class name, or inline JSON: jsonargparse handles it
        try:
            path = next(p.class_path for p in plugins.discover(SHORT_NAME_ARGS[key]).values() if p.name == value)
        except StopIteration:
            plugins.resolve(SHORT_NAME_ARGS[key], value)  # raises with did-you-mean
            raise
        if eq:
            out[i] = f"{key}={path}"
        else:
            out[i + 1] = path
    return out


def run_toy(argv: list[str]) -> None:
    from jsonargparse import CLI

    from opdlab.toy import build_toy

    def toy(name: str = "add3", seed: int = 0, cache_dir: str | None = None, force: bool = False) -> None:
        """Build, gate and cache the embedded toy teacher and student, and compare with the shipped build.

        The default toys (add3, spell2; seed 0) ship with opdlab, so `toy:<name>/...` uses those files
        without building. This command rebuilds them into the cache (with one torch thread: faster
        for these tiny models), to check a machine or a changed recipe; the held-out accuracies of both
        builds are printed side by side.

        Args:
            name: which toy: add3 (reversed 3-digit addition, the default), add2 (fast, for tests) or
                spell2 (2-digit addition with digit or letter spellings: teacher and student disagree).
            seed: training seed of both models.
            cache_dir: where to cache them (default: $OPDLAB_CACHE/toy, i.e. ~/.cache/opdlab/toy).
            force: rebuild even if a cached build exists.
        """
        import json

        import torch

        from opdlab.toy import shipped_toy

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

    CLI(toy, args=argv, prog="opdlab toy")


def run_plugins(argv: list[str]) -> None:
    if argv and argv[0] in ("-h", "--help"):
        print("usage: opdlab plugins\n\nList every registered selector, divergence and rollout engine with the "
              "package it came from, then every plugin that failed to load and why (exit status 1 if any).")
        return
    rows, broken = [], []
    for group in plugins.GROUPS:
        found, errors = plugins.scan(group)
        rows += [(p.group.split(".")[-1], p.name, p.package, p.class_path) for p in found.values()]
        broken += errors
    widths = [max(len(r[i]) for r in [("group", "name", "package", "class"), *rows]) for i in range(4)]
    for row in [("group", "name", "package", "class"), *rows]:
        print("  ".join(col.ljust(w) for col, w in zip(row, widths, strict=True)))
    if broken:
        print(f"\n{len(broken)} broken plugin(s), not loaded:")
        for err in broken:
            print(f"  {err}")
        sys.exit(1)


COMMANDS = {"toy": run_toy, "plugins": run_plugins, "diagnose": run_diagnose, "compare": run_compare}
HELP = """usage: opdlab {fit,validate,test,toy,plugins,diagnose,compare} ...

On-policy distillation with token selection (TA-OPD and baselines).

commands:
  fit        train a student by OPD:       opdlab fit --config configs/ta_opd.yaml
  validate   greedy accuracy of a student: opdlab validate --config ... [--ckpt_path ...]
  test       same, on the test split
  toy        build the embedded toy teacher/student (done automatically by fit)
  plugins    list installed selectors, divergences and rollout engines
  diagnose   fixed-context diagnostic: does θ0 teachability predict OPD gain? (docs/method.md §3)
  compare    selectors side by side over seeds, plus a budget sweep: opdlab compare --help

`opdlab <command> --help` explains every option of a command.
"""


TRACEBACK_ENV = "OPDLAB_TRACEBACK"


def main(argv: list[str] | None = None) -> None:
    """`opdlab ...`: errors that opdlab itself raises (option checks, data, paths, plugins, checkpoints)
    are printed as one `opdlab: error: ...` line; `OPDLAB_TRACEBACK=1` shows the traceback instead.
    Errors raised elsewhere (a bug, a library) keep their traceback."""
    try:
        run(argv)
    except (ValueError, OSError, KeyError, RuntimeError, plugins.PluginError) as err:
        if os.environ.get(TRACEBACK_ENV, "").strip() not in ("", "0") or not raised_by_opdlab(err):
            raise
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        sys.exit(f"opdlab: error: {message}\n(set {TRACEBACK_ENV}=1 to see where it was raised)")


def raised_by_opdlab(err: BaseException) -> bool:
    """True when the innermost frame of the error's traceback is opdlab's own code."""
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and Path(tb.tb_frame.f_code.co_filename).resolve().is_relative_to(PACKAGE_DIR)


PACKAGE_DIR = Path(__file__).resolve().parent


def run(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(HELP)
        return
    if argv[0] in COMMANDS:
        COMMANDS[argv[0]](argv[1:])
        return
    # The frozen teacher is in eval mode on purpose; Lightning warns about it at every fit.
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
    # Manual optimisation (global selection) makes Lightning warn that checkpoints hold the weights after
    # the step; that is what opdlab checkpoints are meant to hold (resume continues from there).
    warnings.filterwarnings("ignore", message=r"Using ModelCheckpoint with manual optimization")
    # main() hands LightningCLI the arguments it read from sys.argv (after expanding plugin short names);
    # LightningCLI warns about "both" being given and prints them twice.
    warnings.filterwarnings("ignore", message=r"LightningCLI's args parameter is intended")
    for group in plugins.GROUPS:
        plugins.discover(group)  # import plugin classes so jsonargparse resolves their names
    try:
        argv = expand_short_names(argv)
    except ValueError as err:
        sys.exit(f"opdlab: error: {err}")
    OPDLabCLI(
        OPDModule, PromptDataModule, args=argv, trainer_defaults=TRAINER_DEFAULTS,
        auto_configure_optimizers=False, save_config_kwargs={"overwrite": True},
        parser_class=OPDLabArgumentParser,
    )


if __name__ == "__main__":
    main()
