"""`opdlab fit / validate / test`: LightningCLI over OPDModule and PromptDataModule.

Imported only when one of these commands runs (`opdlab --help`, `plugins` and `toy` stay light).
"""

from __future__ import annotations

import sys
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import ClassVar, Optional

from jsonargparse import ActionYesNo, Namespace
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from opdlab import plugins
from opdlab.callbacks import FitSummary, RolloutSamples, SelectionMetrics, TeachabilityHistograms
from opdlab.callbacks.interrupt import SaveOnInterrupt
from opdlab.callbacks.trace import StageTrace
from opdlab.console import refuse_in_one_line, silence_lightning_noise, stop_signals
from opdlab.data import PromptDataModule
from opdlab.evaluation import EvalOptions, load_benchmark, replacing_lists, response_limits
from opdlab.evaluation import check_config_files as check_eval_settings_files
from opdlab.module import OPDModule
from opdlab.runs import RunError, lock_run, remove_runs_without_results, resolve_run, writable_folder

TRAINER_DEFAULTS = {
    "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger", "init_args": {"save_dir": "runs", "name": "opdlab"}},
    "num_sanity_val_steps": 0,
    "inference_mode": False,  # metrics and caches made in validation are reused in training
    "max_steps": 200,
    "plugins": [{"class_path": "opdlab.checkpointing.AtomicCheckpointIO"}],
    "enable_model_summary": False,  # a table of two models' parameter counts and "FLOPs: 0" on every run
}
LIGHTNING_CSV_LOGGERS = ("lightning.pytorch.loggers.CSVLogger", "lightning.pytorch.loggers.csv_logs.CSVLogger")
SHORT_NAME_ARGS = {"--model.selector": "opdlab.selectors", "--model.divergence": "opdlab.divergences",
                   "--model.rollout_engine": "opdlab.rollout_engines",
                   "--model.teacher_placement": "opdlab.teacher_placements"}
SHORT_NAME_ARGS.update({f"{key}.help": group for key, group in SHORT_NAME_ARGS.items()})  # `--model.selector.help tip`


class OPDLabArgumentParser(LightningArgumentParser):
    """Adds "did you mean" to errors about unknown options or config keys (typos), and a short usage line
    (argparse's own would list all ~400 options before the help proper)."""

    def format_usage(self) -> str:
        return self.with_short_usage(super().format_usage)

    def format_help(self) -> str:
        return self.with_short_usage(super().format_help)

    def with_short_usage(self, format_text) -> str:
        if " " not in self.prog:  # the top-level parser: argparse's usage of the subcommands is short
            return format_text()
        self.usage = (f"{self.prog.replace(' [options]', '')} [--config CONFIG] [--print_config] [--model.* ...] "
                      "[--data.* ...] [--trainer.* ...] [--ckpt_path CKPT_PATH]")
        try:
            return format_text()
        finally:
            self.usage = None

    def error(self, message: str, ex: Exception | None = None):
        """One line with the closest known keys, instead of the whole usage (hundreds of options) first."""
        return refuse_in_one_line(self, message, ex, super().error)


class OPDLabCLI(LightningCLI):
    """LightningCLI over `OPDModule` and `PromptDataModule`; `fit` also reports accuracy before/after."""

    argv: ClassVar[list[str]] = []  # this fit's command line (set by run_fit), for the --resume hint after an interrupt
    run_base: Path | None = None  # where this fit's run folder goes, and the folders there before it
    runs_before: ClassVar[set] = set()
    current_trainer = None
    trainer_log_dir_hint: str | None = None  # the folder a --resume continues in

    def instantiate_trainer(self, *args, **kwargs):
        trainer = OPDLabCLI.current_trainer = super().instantiate_trainer(*args, **kwargs)
        return trainer

    def add_core_arguments_to_parser(self, parser) -> None:
        """opdlab's own options (model, data) before the Trainer's, so `fit --help` reads from the top."""
        parser.add_lightning_class_args(self._model_class, "model", subclass_mode=self.subclass_mode_model)
        parser.add_lightning_class_args(self._datamodule_class, "data", subclass_mode=self.subclass_mode_data)
        parser.add_lightning_class_args(self.trainer_class, "trainer")
        parser.set_defaults({"trainer." + k: v for k, v in self.trainer_defaults.items() if k != "callbacks"})

    def add_arguments_to_parser(self, parser) -> None:
        # Always-on callbacks, configurable under their own top-level keys
        # (e.g. `--teachability_histograms.every_n_steps 10`). TokenBank is opt-in via trainer.callbacks.
        parser.add_lightning_class_args(SelectionMetrics, "selection_metrics")
        parser.add_lightning_class_args(TeachabilityHistograms, "teachability_histograms")
        parser.add_lightning_class_args(RolloutSamples, "rollout_samples")
        parser.add_lightning_class_args(StageTrace, "stage_trace")
        parser.add_class_arguments(EvalOptions, "eval", help="sampled evaluation of the exported student after "
                                   "training (off while eval.benchmarks is empty; same options as `opdlab eval`)")
        parser.add_argument("--run_name", type=Optional[str], default=None,
                            help="name of this run's folder under the logger's save_dir/name (default: "
                                 "version_N, the next free number); printed when the run starts")
        parser.add_argument("--resume", action=ActionYesNo, default=False,
                            help="continue the run named by --run_name, or else the most recent run with a "
                                 "checkpoints/last.ckpt, in the same folder and curves; with --ckpt_path, from "
                                 "another checkpoint of that run's checkpoints/ folder than last.ckpt")

    def before_instantiate_classes(self) -> None:
        """Run folders and logging: validate/test write no logs; fit resolves --run_name / --resume."""
        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand else self.config  # no subcommand: run=False (tests)
        if subcommand in ("validate", "test"):
            config.trainer.logger = False  # an evaluation is printed; it does not clutter the training runs
            self.save_config_callback = None  # nor the working directory (no log folder to save config.yaml in)
            eval_group = config.get("eval")
            if eval_group is not None and (eval_group.get("benchmarks") or eval_settings_changed(eval_group)):
                raise RunError(f"--eval.* evaluates the student exported at the end of `opdlab fit`; `opdlab "
                               f"{subcommand}` does not run it. Evaluate a model with: opdlab eval --model <run "
                               "folder or model> --config <the eval settings>")
        elif subcommand == "fit":
            check_fit_options(config)
            eval_group = config.get("eval")
            changed = eval_settings_changed(eval_group) if eval_group is not None else []
            if changed and not eval_group.get("benchmarks"):
                raise RunError(f"--eval.{changed[0]} is set but --eval.benchmarks is empty, so nothing would be "
                               "evaluated after training; name the sets (e.g. --eval.benchmarks '[{name: add3, path: "
                               "\"toy:add3\"}]' or an eval: group like configs/eval/toy.yaml's), or drop the --eval.* "
                               "options")
            if config.trainer.get("fast_dev_run"):  # a dry run writes nothing: no run folder, checkpoint or export
                if config.get("resume") or config.get("ckpt_path"):
                    raise RunError("--trainer.fast_dev_run is a dry run of a new fit; it does not resume "
                                   "(drop --resume / --ckpt_path)")
                config.trainer.logger = False
                self.save_config_callback = None
                config.trainer.enable_checkpointing = False  # a ModelCheckpoint would still create its folder
                config.trainer.callbacks = [c for c in (config.trainer.get("callbacks") or [])
                                            if not str(getattr(c, "class_path", "")).endswith("ModelCheckpoint")]
            else:
                self.resolve_run_folder(config)
        check_accelerator(config.trainer)
        interval = config.trainer.get("val_check_interval")
        if isinstance(interval, (int, float)) and not isinstance(interval, bool) and interval <= 0:
            raise RunError(f"trainer.val_check_interval must be > 0 (steps between validations, or a fraction of "
                           f"an epoch), got {interval}")
        added = ["opdlab.callbacks.FitSummary"] + (["opdlab.callbacks.interrupt.SaveOnInterrupt"] if subcommand == "fit" else [])
        if config.trainer.get("enable_progress_bar") is not False:  # steps out of max_steps, not epochs
            added.append("opdlab.callbacks.progress.StepProgressBar")
        config.trainer.callbacks = [*(config.trainer.get("callbacks") or []), *(Namespace(class_path=c) for c in added)]
        self.check_resume_options()

    def resolve_run_folder(self, config) -> None:
        logger = config.trainer.logger
        init = getattr(logger, "init_args", None)
        if init is None or init.get("save_dir") is None:
            if config.get("resume") or config.get("run_name"):
                raise RunError("--resume and --run_name need a logger with a save_dir (e.g. TensorBoardLogger)")
            return
        if logger.class_path in LIGHTNING_CSV_LOGGERS:  # Lightning's deletes metrics.csv when a run resumes
            logger.class_path = "opdlab.loggers.CSVLogger"
        if logger.class_path.endswith("TensorBoardLogger") and init.get("default_hp_metric", True):
            init.default_hp_metric = False  # a placeholder hp_metric=-1 curve in every run otherwise
        writable_folder(init.save_dir, "--trainer.logger.init_args.save_dir")
        base = Path(init.save_dir) / (init.get("name") or "")
        resume = bool(config.get("resume"))
        version, checkpoint = resolve_run(base, config.get("run_name"), resume,
                                          config.get("ckpt_path") if resume else None)
        step = None
        if checkpoint is not None:  # before anything reads it: a damaged one names the intact checkpoint beside it
            step = check_something_to_train(checkpoint, config.trainer.get("max_steps"), base / version)
        OPDLabCLI.run_base = base  # a new run folder that ends up empty is removed (run_fit)
        OPDLabCLI.runs_before = {p for p in base.glob("*") if p.is_dir()} if base.is_dir() else set()
        if version is not None:
            init.version = version
            lock_run(base / version)  # a named or resumed run: one fit at a time
        if checkpoint is not None and logger.class_path.endswith("TensorBoardLogger"):
            # Steps after the checkpoint are trained again: TensorBoard drops their earlier points (purge_step).
            # Points sit at the number of steps done (OPDModule.log_step): step N's are kept, N + 1's on go.
            init.purge_step = step + 1
        self.trainer_log_dir_hint = str(base / version) if version is not None and checkpoint is not None else None
        if checkpoint is not None:
            config.ckpt_path = str(checkpoint)

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

            # memory-mapped: only the hyperparameters are read, not the weights and optimizer state (tens of GB)
            saved = torch.load(ckpt_path, weights_only=True, map_location="cpu", mmap=True).get("hyper_parameters", {})
        except Exception:  # noqa: BLE001 - an unreadable file is reported clearly when the run loads it
            return
        given = self.config[subcommand]["model"]
        for key in ("student", "teacher"):
            if key in saved and saved[key] != given.get(key):
                raise RunError(f"--ckpt_path {ckpt_path} was trained with model.{key}={saved[key]!r}, but this run "
                               f"names {given.get(key)!r}; resume with the same {key} (or start a new run without "
                               "--ckpt_path)")
        now = flat_options(given)
        warned = set()
        for key, value in flat_options(saved).items():
            if key in now and key not in ("student", "teacher") and now[key] != value:
                warned.add(f"model.{key}")
                warnings.warn(f"resuming from {ckpt_path} with model.{key}={now[key]!r} (the checkpoint was "
                              f"trained with {value!r})", stacklevel=1)
        self.compare_with_recorded_config(Path(ckpt_path), warned)

    def compare_with_recorded_config(self, ckpt_path: Path, warned: set[str]) -> None:
        """Every option (selector, divergence, optimizer, data, trainer ...) against the config.yaml of the run
        the checkpoint belongs to: a warning per difference. That record is kept: a resume in the same folder
        saves its own config as config.resume-N.yaml."""
        recorded_path = ckpt_path.parent.parent / "config.yaml"
        if not recorded_path.is_file():
            return
        import yaml

        subcommand = self.config.get("subcommand")
        try:
            recorded = flat_options(yaml.safe_load(recorded_path.read_text()) or {})
        except (OSError, yaml.YAMLError):
            return
        now = {key: plain(value) for key, value in flat_options(self.config[subcommand].clone().as_dict()).items()}
        ignore = {"ckpt_path", "resume", "run_name", "trainer.max_steps", "config"}
        for key in sorted(set(recorded) | set(now)):
            if key in ignore or key in warned or key.startswith("trainer.logger") or recorded.get(key) == now.get(key):
                continue
            warnings.warn(f"resuming from {ckpt_path} with {key}={now.get(key)!r} (the run was started with "
                          f"{recorded.get(key)!r}, {recorded_path})", stacklevel=1)
        same_folder = Path(self.trainer_log_dir_hint or "") == recorded_path.parent
        if same_folder:
            count = len(list(recorded_path.parent.glob("config.resume-*.yaml"))) + 1
            self.save_config_kwargs["config_filename"] = f"config.resume-{count}.yaml"

    def eval_options(self) -> EvalOptions | None:
        """The `--eval.*` group when it names benchmarks (checked, files read), else None."""
        options = self.config_init[self.config.subcommand].get("eval")
        if options is None or not options.benchmarks:
            return None
        # older jsonargparse leaves a dataclass group as a Namespace, and benchmarks may stay Namespaces
        return EvalOptions.from_mapping(options if isinstance(options, Namespace) else vars(options))

    def before_fit(self) -> None:
        ckpt_path = self.config[self.config.subcommand].get("ckpt_path")
        options = self.eval_options()
        if options is not None:  # bad evaluation settings are refused before any model loads, not after training
            options.check()
            self.eval_benchmarks = [load_benchmark(b) for b in options.benchmarks]
            response_limits(options, self.eval_benchmarks)
        if self.trainer.is_global_zero and self.trainer.fast_dev_run:
            print(f"opdlab fit: --trainer.fast_dev_run: a dry run of {int(self.trainer.fast_dev_run)} step(s); nothing "
                  "will be saved", flush=True)
        elif self.trainer.is_global_zero:
            run = Path(self.trainer.log_dir or self.trainer.default_root_dir)
            viewer = (f" (tensorboard --logdir {run.parent})"
                      if any(type(lg).__name__ == "TensorBoardLogger" for lg in self.trainer.loggers) else "")
            callback, folder = self.trainer.checkpoint_callback, run / "checkpoints"
            periodic = callback is not None and (getattr(callback, "_every_n_train_steps", 0) or callback.save_last)
            saves = (f"checkpoints in {callback.dirpath or folder}" if periodic else
                     f"no checkpoints during training (add a ModelCheckpoint with every_n_train_steps and save_last; "
                     f"Ctrl-C and SIGTERM save {folder / 'last.ckpt'})")
            print(f"opdlab fit: run folder {run}{viewer}; {saves}; the trained student will be exported to "
                  f"{run / 'student'}", flush=True)
            if ckpt_path:
                print(f"opdlab fit: resuming from {ckpt_path}", flush=True)
        # One event file per fit: Lightning closes the loggers after each trainer call (this validation, fit, the
        # validation after it) and TensorBoard reopens in a new file; they are closed once, at the end of after_fit.
        keep_loggers_open(self.trainer)
        if not ckpt_path:  # the accuracy before training (FitSummary); a resumed run's is in its checkpoint
            self.trainer.validate(self.model, datamodule=self.datamodule, verbose=False)  # builds the models first

    def after_fit(self) -> None:
        try:
            self.finish_fit()
        finally:
            close_loggers(self.trainer)

    def finish_fit(self) -> None:
        trainer = self.trainer
        interrupt = next((c for c in trainer.callbacks if isinstance(c, SaveOnInterrupt)), None)
        if interrupt is not None and interrupt.stopped_by is not None:
            self.exit_interrupted(interrupt)
        summary = next(c for c in trainer.callbacks if isinstance(c, FitSummary))
        if trainer.fast_dev_run:
            if trainer.is_global_zero:
                print(f"\nopdlab fit: --trainer.fast_dev_run: a dry run of {trainer.global_step} step(s) ran; nothing "
                      f"was saved (no run folder, checkpoint, summary or exported student). Student accuracy after it: "
                      f"{summary.accuracy:.1%} (one validation batch; not a result)", flush=True)
            return
        export = Path(trainer.log_dir or trainer.default_root_dir) / "student"  # log_dir and export are collectives
        with interruptible(trainer, lambda signum: self.stopped_before_export(signum)):
            if summary.accuracy_step != trainer.global_step:  # no validation after the last step yet
                trainer.validate(self.model, datamodule=self.datamodule, verbose=False)
            self.model.export_student(str(export))
        if trainer.is_global_zero:
            lines = [*summary.lines(trainer.global_step), f"student exported to {export}"]
            print("\n".join(["", "opdlab fit summary", *lines]))
        self.evaluate_exported(export)

    def stopped_before_export(self, signum: int) -> None:
        """SIGINT/SIGTERM in the validation or export after the last step: keep the trained weights (a checkpoint,
        unless one of this step is there) and say how to finish (a --resume at max_steps validates and exports)."""
        import shlex
        import signal

        trainer = self.trainer
        path = SaveOnInterrupt.checkpoint_path(trainer)
        saved = path.is_file() and safe_checkpoint_step(path) == trainer.global_step
        if not saved:
            trainer.save_checkpoint(str(path))
        args = [a for a in self.argv if a not in ("--resume", "--resume=true")]
        run_name = [] if "--run_name" in args else ["--run_name", Path(trainer.log_dir or "").name]
        print(f"\nopdlab fit: stopped by {signal.Signals(signum).name} in the validation and export after step "
              f"{trainer.global_step} (training had finished); the trained weights are in {path}"
              f"{'' if saved else ' (saved now)'}\nfinish (validate and export) with: opdlab "
              f"{shlex.join([*args, *run_name])} --resume", flush=True)

    def evaluate_exported(self, export: Path) -> None:
        """`--eval.*`: the same sampled evaluation as `opdlab eval --model <export>`, into <run>/eval."""
        options = self.eval_options()
        if options is None:
            return
        if self.trainer.world_size > 1:  # the engine and the student are sharded across the ranks here
            if self.trainer.is_global_zero:
                print(f"opdlab fit: --eval.* runs in single-process fits only; evaluate the export with: opdlab eval "
                      f"--model {export} --config <the eval settings>", flush=True)
            return
        from opdlab.evaluation import evaluate, load_model, markdown_table, run_greedy_accuracy, sampling_note

        out = export.parent / "eval"
        with interruptible(self.trainer, lambda signum: self.stopped_in_eval(signum, export, out, options,
                                                                              self.eval_engine_options())):
            net, tokenizer, label = load_model(str(export), self.model.memory_options.student_dtype)
            net.to(self.model.device)
            print(f"\nopdlab fit: evaluating the exported student ({len(options.benchmarks)} set(s), k={options.k}) "
                  f"into {out}", flush=True)
            result = evaluate(net, tokenizer, self.model.rollout_engine, options, out, label, overwrite=True,
                              command="opdlab fit " + " ".join(self.argv), loaded=getattr(self, "eval_benchmarks", None))
        note = sampling_note(result, run_greedy_accuracy(export.parent) if export.parent.is_dir() else None)
        print(markdown_table(result, label) + (f"\n{note}" if note else ""), flush=True)

    def eval_engine_options(self) -> list[str]:
        """The `opdlab eval` options that reproduce this fit's engine and student dtype (eval.json records both)."""
        engine = type(self.model.rollout_engine)
        names = [name for name, plugin in plugins.discover("opdlab.rollout_engines").items() if plugin.cls is engine]
        engine_args = ["--engine", names[0]] if names and names[0] != "static" else \
            [] if names else ["--engine", f"{engine.__module__}.{engine.__qualname__}"]
        dtype = self.model.memory_options.student_dtype
        return [*engine_args, *(["--dtype", dtype] if dtype != "float32" else [])]

    @staticmethod
    def stopped_in_eval(signum: int, export: Path, out: Path, options: EvalOptions, engine_args: list[str]) -> None:
        """SIGINT/SIGTERM in the evaluation after training: the student is exported and the responses written so
        far are kept; the evaluation's settings go to a config file `opdlab eval` continues from."""
        import dataclasses
        import shlex
        import signal

        import yaml

        settings = export.parent / "eval_config.yaml"
        settings.write_text(yaml.safe_dump(plain(dataclasses.asdict(options)), sort_keys=False))
        print(f"\nopdlab fit: stopped by {signal.Signals(signum).name} in the evaluation after training; the trained "
              f"student is exported to {export}, the responses generated so far are kept in {out}\ncontinue the "
              f"evaluation with: opdlab eval --model {shlex.quote(str(export))} --config {shlex.quote(str(settings))} "
              f"--out_dir {shlex.quote(str(out))}{''.join(' ' + shlex.quote(a) for a in engine_args)}", flush=True)

    def exit_interrupted(self, interrupt: SaveOnInterrupt) -> None:
        """After SIGINT/SIGTERM: where the checkpoint is, the command that continues, exit 128 + signal."""
        import shlex
        import signal

        if self.trainer.is_global_zero:
            args = [a for a in self.argv if a not in ("--resume", "--resume=true")]
            print(f"\nopdlab fit: stopped by {signal.Signals(interrupt.stopped_by).name} after step "
                  f"{self.trainer.global_step}; checkpoint saved to {interrupt.saved}\ncontinue with: opdlab "
                  f"{shlex.join(args)} --resume", flush=True)
        sys.exit(128 + int(interrupt.stopped_by))


@contextmanager
def interruptible(trainer, on_stop):
    """SIGINT/SIGTERM stop the block (Lightning's own handlers are gone once training ended, and the validation it
    runs turns a KeyboardInterrupt into exit 1): `on_stop(signal number)` says what was kept, then the process exits
    with 128 + the signal. Single-process runs only (several ranks would have to agree); elsewhere a no-op."""
    if trainer.world_size > 1:
        yield
        return
    stopped = False
    with stop_signals() as received:
        try:
            yield
        except (KeyboardInterrupt, SystemExit):
            if not received:
                raise
            stopped = True  # (a block that caught the interrupt itself and finished is not stopped here)
    if stopped:  # the handlers are restored: a second Ctrl-C while on_stop reports is Python's own again
        on_stop(received[0])
        sys.exit(128 + received[0])


def keep_loggers_open(trainer) -> None:
    """Lightning finalizes (closes) the loggers at the end of every trainer call, and a TensorBoard writer then
    reopens in a new event file. Until `close_loggers`, finalizing flushes and saves only (a crash loses nothing)."""
    for logger in trainer.loggers:
        if "finalize" not in vars(logger):
            logger.finalize = lambda status, logger=logger: flush_logger(logger)


def flush_logger(logger) -> None:
    experiment = getattr(logger, "_experiment", None)  # the TensorBoard writer, when one was opened
    if experiment is not None and hasattr(experiment, "flush"):
        experiment.flush()
    logger.save()


def close_loggers(trainer) -> None:
    """Lightning's own finalize, once, at the end of `opdlab fit`."""
    for logger in trainer.loggers:
        if "finalize" in vars(logger):
            del logger.finalize
            logger.finalize("success")


def check_accelerator(trainer) -> None:
    """A config written for GPUs (accelerator gpu/cuda, several devices, a sharding strategy) on a machine without
    one: name every option to change, not Lightning's 'No supported gpu backend found!'."""
    accelerator = str(trainer.get("accelerator") or "auto").lower()
    if accelerator not in ("gpu", "cuda"):
        return
    import torch

    if torch.cuda.is_available():
        return
    changes = ["--trainer.accelerator cpu", "--trainer.devices 1"]
    strategy = trainer.get("strategy")
    if strategy not in (None, "auto"):
        changes.append("--trainer.strategy auto")
    if str(trainer.get("precision") or "").startswith(("16", "bf16")):
        changes.append("--trainer.precision 32-true")
    raise RunError(f"this config asks for --trainer.accelerator {accelerator}, and this machine has no GPU (torch sees "
                   f"no CUDA device): to run it on the CPU add {' '.join(changes)}; for your own models on a CPU start "
                   "from configs/own_models_cpu.yaml")


def check_fit_options(config) -> None:
    """Options a fit refuses before any model loads."""
    memory = config.model.get("memory")
    dtype = memory.get("student_dtype") if memory is not None else None
    if dtype == "float16":
        raise RunError("--model.memory.student_dtype float16 trains the student's weights in float16 without loss "
                       "scaling: its updates overflow (NaN weights after one step on the toy). Train in bfloat16 "
                       "(--model.memory.student_dtype bfloat16) or keep float32 weights (the default), optionally with "
                       "--trainer.precision bf16-mixed; float16 is fine for a frozen teacher (--model.memory.teacher_dtype)")


def check_something_to_train(checkpoint: Path, max_steps, folder: Path) -> int:
    """A resume of a run that already trained its max_steps and exported its student has nothing to do; a damaged
    checkpoint names the intact one beside it. Returns the checkpoint's global step."""
    step = safe_checkpoint_step(checkpoint)
    if step is None:
        steps = {p: safe_checkpoint_step(p) for p in checkpoint.parent.glob("*.ckpt") if p != checkpoint}
        intact = sorted((p for p, s in steps.items() if s is not None), key=steps.get)  # each file read once
        hint = (f"; the newest intact checkpoint beside it is {intact[-1]} (step {steps[intact[-1]]}): "
                f"continue the run from it with --resume --run_name {folder.name} --ckpt_path {intact[-1]}") \
            if intact else \
            "; no intact checkpoint is beside it: start a new run"
        raise RunError(f"cannot resume: {checkpoint} is damaged or incomplete (not a readable checkpoint){hint}")
    if isinstance(max_steps, int) and 0 <= max_steps <= step and (folder / "student").is_dir():
        raise RunError(f"run {folder} is finished: its checkpoint is at step {step} (trainer.max_steps {max_steps}) and "
                       f"its student is exported to {folder / 'student'}; raise --trainer.max_steps to train further, or "
                       f"evaluate it: opdlab eval --model {folder}")
    return step


def safe_checkpoint_step(path: Path) -> int | None:
    """checkpoint_step, or None for a file that is not a readable checkpoint (truncated, garbage)."""
    try:
        return checkpoint_step(path)
    except Exception:  # noqa: BLE001 - any unreadable file is "not a checkpoint" here
        return None


def checkpoint_step(path: Path) -> int:
    """The global step a checkpoint was saved at, without reading its tensors (memory-mapped)."""
    import torch

    return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["global_step"])


def plain(value):
    """A value as YAML reads it back (tuples become lists), for comparing with a saved config."""
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


def eval_settings_changed(group) -> list[str]:
    """The `--eval.*` settings (other than benchmarks) that differ from their defaults: given by the user."""
    import dataclasses

    defaults = EvalOptions()
    return [f.name for f in dataclasses.fields(EvalOptions) if f.name != "benchmarks"
            and f.name in group and plain(group[f.name]) != plain(getattr(defaults, f.name))]


def flat_options(options, prefix: str = "") -> dict:
    """{"rollout.max_new_tokens": 50, ...} from nested option groups (dicts or Namespaces)."""
    items = options.items() if isinstance(options, dict) else vars(options).items()
    flat = {}
    for key, value in items:
        if isinstance(value, (dict, Namespace)) and not (isinstance(value, Namespace) and "class_path" in value):
            flat.update(flat_options(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


# Option groups: in a config file each is a mapping of its options, never a single value or null.
OPTION_GROUPS = ("model", "data", "trainer", "eval", "model.rollout", "model.memory", "model.training",
                 "selection_metrics", "teachability_histograms", "rollout_samples")


def check_config_files(argv: list[str]) -> None:
    """Each `--config` file: a YAML mapping whose option groups are mappings. A group given one value or null
    (`model: {rollout: 5}`, `trainer: 3`, `model: null`) is refused in one line; jsonargparse would crash on the first and
    silently drop the whole group (every trainer option of the earlier configs) on the second. An empty file, and an
    `--eval` file that is not a mapping, are refused too (jsonargparse said only "Unexpected config")."""
    files = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--config"]
    files += [a.partition("=")[2] for a in argv if a.startswith("--config=")]
    for name in files:
        check_config_file(name)
    check_eval_settings_files(argv, "--eval")  # --eval FILE: the evaluation settings, read as opdlab eval reads them


def check_config_file(name: str) -> None:
    import yaml

    path = Path(name)
    if not path.is_file():
        return  # missing (or inline settings): jsonargparse's own one-line error
    try:
        loaded = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return  # unreadable files: jsonargparse's own one-line error
    if loaded is None:
        raise RunError(f"--config {name} is empty (no settings in it); pass a settings file such as "
                       "configs/ta_opd.yaml, or drop --config")
    if not isinstance(loaded, dict):
        raise RunError(f"config {name}: the top level must be a mapping of option groups (model:, data:, trainer: "
                       f"...), got a {type(loaded).__name__}; see configs/ta_opd.yaml")
    for group in OPTION_GROUPS:
        parent, _, key = group.rpartition(".")
        holder = loaded.get(parent) if parent else loaded
        if not isinstance(holder, dict) or key not in holder:
            continue
        value = holder[key]
        if not isinstance(value, dict):  # null too: it crashed, or dropped the earlier configs' options
            raise RunError(f"config {name}: {group} is a group of options and must be a mapping (e.g. "
                           f"{example_of(group)}), got {'null' if value is None else repr(value)}; leave the "
                           "group out to keep its defaults; run 'opdlab fit --help' for its options")


def example_of(group: str) -> str:
    examples = {"model.rollout": "rollout: {num_samples: 4}", "model.memory": "memory: {chunk_size: 256}",
                "model.training": "training: {seed: 0}", "trainer": "trainer: {max_steps: 200}",
                "data": "data: {batch_size: 64}", "model": "model: {student: toy:add3/student}",
                "eval": "eval: {k: 8}"}
    return examples.get(group, f"{group.rpartition('.')[2]}: {{option: value}}")


def implied_placement(argv: list[str]) -> list[str]:
    """`--model.teacher_placement.<option> ...` without `--model.teacher_placement <name>`: name the placement that
    accepts the run's teacher string (`TeacherPlacement.accepts`: a URL is `vllm_server`, a plugin claims its own
    scheme) before the first of them, so jsonargparse knows whose options they are. The teacher string is the
    command line's `--model.teacher`, else the last `--config` file's `model.teacher`."""
    key = "--model.teacher_placement"
    options = [i for i, a in enumerate(argv) if a.startswith(key + ".") and not a.startswith(key + ".help")]
    if not options or any(a == key or a.startswith(key + "=") for a in argv):
        return argv
    teacher = option_value(argv, "--model.teacher") or config_teacher(argv)
    if not teacher:
        return argv
    name = plugins.placement_name_for(teacher)
    if name is None:
        plugins.default_placement(teacher)  # refuses the string in its own words (an unclaimed scheme, say)
        return argv
    return [*argv[: options[0]], key, name, *argv[options[0]:]]


def option_value(argv: list[str], key: str) -> str | None:
    """The last value given to `key` on a command line (`key value` or `key=value`)."""
    value = None
    for i, arg in enumerate(argv):
        if arg == key and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(key + "="):
            value = arg.partition("=")[2]
    return value


def config_teacher(argv: list[str]) -> str | None:
    """`model.teacher` of the last `--config` file that sets it (None where none does or a file cannot be read)."""
    import yaml

    teacher = None
    for i, arg in enumerate(argv):
        path = argv[i + 1] if arg == "--config" and i + 1 < len(argv) else arg.partition("=")[2] if arg.startswith("--config=") else None
        if path is None:
            continue
        try:
            data = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError):
            continue
        model = data.get("model") if isinstance(data, dict) else None
        if isinstance(model, dict) and isinstance(model.get("teacher"), str):
            teacher = model["teacher"]
    return teacher


def run_fit(argv: list[str]) -> None:
    """LightningCLI with opdlab's defaults, after expanding plugin short names."""
    silence_lightning_noise()
    # Manual optimisation (global selection) makes Lightning warn that checkpoints hold the weights after
    # the step; that is what opdlab checkpoints are meant to hold (resume continues from there).
    warnings.filterwarnings("ignore", message=r"Using ModelCheckpoint with manual optimization")
    # main() hands LightningCLI the arguments it read from sys.argv (after expanding plugin short names);
    # LightningCLI warns about "both" being given and prints them twice.
    warnings.filterwarnings("ignore", message=r"LightningCLI's args parameter is intended")
    # --resume continues in the run's own folder, where the checkpoints already are (a new run's folder is new).
    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
    for group in plugins.GROUPS:
        plugins.discover(group)  # import plugin classes so jsonargparse resolves their names
    check_config_files(argv)
    argv = plugins.expand_short_names(implied_placement(argv), SHORT_NAME_ARGS)  # an unknown name: one line (cli.main)
    OPDLabCLI.argv = ["fit", *argv] if argv[:1] != ["fit"] else list(argv)
    OPDLabCLI.run_base, OPDLabCLI.current_trainer = None, None
    try:
        OPDLabCLI(
            OPDModule, PromptDataModule, args=replacing_lists(argv, "--eval.benchmarks"), trainer_defaults=TRAINER_DEFAULTS,
            auto_configure_optimizers=False, save_config_kwargs={"overwrite": True},
            parser_class=OPDLabArgumentParser,
        )
    except BaseException:
        base, before, trainer = OPDLabCLI.run_base, OPDLabCLI.runs_before, OPDLabCLI.current_trainer
        if trainer is not None:
            try:
                close_loggers(trainer)
            except Exception:  # noqa: BLE001 - the error being raised matters, not a logger's on the way out
                pass
        if base is not None and (trainer is None or trainer.global_step == 0):  # failed before its first step
            for folder in remove_runs_without_results(base, before):
                print(f"opdlab fit: removed {folder} (the run stopped before its first step)", file=sys.stderr)
        raise

