"""What a person reads of a run: the progress in a log that is not a terminal, the run's summary.json, and
plots whose labels and titles do not overlap or fall outside the figure."""

from __future__ import annotations

import io
import itertools
import json
import re
import sys
import time
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
from conftest import CONFIG_DIR, run_opdlab

from opdlab.callbacks.progress import StepProgressBar

TRAIN_LINE = re.compile(r"train (\d+)/(\d+) train/loss=\S+( val/accuracy=\S+)? \[\d+ s, \d+\.\d\d s/step\]")


def fit_args(tiny, tmp_path: Path, steps: int = 3) -> list[str]:
    return ["fit", "--config", str(CONFIG_DIR / "fast.yaml"), "--model.student", tiny.student, "--model.teacher",
            tiny.teacher, "--trainer.max_steps", str(steps), "--trainer.val_check_interval", "2",
            "--data.batch_size", "4", "--data.val_batch_size", "16", "--data.source.init_args.num_eval", "16",
            "--trainer.logger.init_args.save_dir", str(tmp_path)]


@pytest.fixture(scope="module")
def redirected_fit(tiny_checkpoints, tmp_path_factory):
    """A fit whose stdout and stderr are captured (not a terminal), as in a log file or CI."""
    root = tmp_path_factory.mktemp("redirected_fit")
    result = run_opdlab(fit_args(tiny_checkpoints, root))
    assert result.code == 0, result.err[-3000:]
    return root, result


# ------------------------------------------------------------------------------ progress when not a terminal
def test_a_fit_not_on_a_terminal_prints_plain_progress_lines(redirected_fit):
    _, result = redirected_fit
    out = result.out
    assert "\r" not in out and "\x1b[" not in out, "no bar redraws on stdout"
    bar_words = ("train", "Validation", "Epoch", "Sanity")  # no bar of training or validation on stderr either
    assert not [line for line in re.split(r"[\r\n]", result.err) if line.strip().startswith(bar_words)]
    train = [line for line in out.splitlines() if line.startswith("train ")]
    assert train and all(TRAIN_LINE.fullmatch(line) for line in train), train
    assert [TRAIN_LINE.fullmatch(line).group(1) for line in train] == ["1", "2", "3"]  # 3 steps: first, 10%s, last
    vals = [line for line in out.splitlines() if line.startswith("val at step")]
    assert vals == [vals[0]] and re.fullmatch(r"val at step 2: val/accuracy=\S+", vals[0]), vals  # one per validation


def test_a_fit_on_a_terminal_still_draws_the_bar(tiny_checkpoints, tmp_path):
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    from opdlab.cli import main

    out = Terminal()
    with mock.patch.object(sys, "argv", ["opdlab"]), mock.patch.object(sys, "stdout", out), \
            mock.patch.object(sys, "stderr", io.StringIO()):
        main(fit_args(tiny_checkpoints, tmp_path))
    text = out.getvalue()
    assert "\r" in text and "train: 100%" in text and "3/3" in text  # tqdm's bar, redrawn in place
    assert not re.search(r"^train \d+/\d+ ", text, re.MULTILINE), "no plain lines on a terminal"


def test_plain_lines_come_at_the_first_step_every_tenth_after_a_while_and_at_the_end():
    bar = StepProgressBar(plain_interval=30.0)
    bar.plain_first_step, bar.plain_last_step, bar.plain_last_time = 0, 0, time.monotonic()  # a line just now
    assert [step for step in range(1, 201) if bar.plain_line_due(step, 200)] == [1, *range(20, 201, 20)]
    assert [step for step in range(1, 26) if bar.plain_line_due(step, 25)] == [1, *range(3, 25, 3), 25]  # and the end
    assert [step for step in range(1, 8) if bar.plain_line_due(step, 7)] == list(range(1, 8))  # a short run: each
    bar.plain_last_step = 37
    assert not bar.plain_line_due(37, 200), "a step is printed once (a skipped step does not advance)"
    assert not bar.plain_line_due(55, -1)  # no max_steps: only the time between lines
    bar.plain_last_time = time.monotonic() - 31  # 31 s without a line
    assert bar.plain_line_due(7, 200) and bar.plain_line_due(55, -1)


# ------------------------------------------------------------------------------ summary.json
def test_fit_writes_summary_json_in_its_run_folder(redirected_fit):
    root, result = redirected_fit
    (path,) = root.glob("*/*/summary.json")
    summary = json.loads(path.read_text())
    assert path.parent == next(root.glob("*/*/student")).parent, "beside the exported student"
    assert summary["steps"] == 3
    assert [v["step"] for v in summary["validations"]] == [0, 2, 3]  # before, every 2 steps, after the last
    assert summary["accuracy_before"] == summary["validations"][0]["accuracy"]
    assert summary["accuracy_after"] == summary["validations"][-1]["accuracy"] and summary["accuracy_after_step"] == 3
    assert 0.0 <= summary["teacher_accuracy"] <= 1.0
    assert summary["train_seconds"] > 0 and summary["response_tokens"] > 0
    assert summary["response_tokens_per_second"] == summary["response_tokens"] / summary["train_seconds"]
    printed = result.out[result.out.index("opdlab fit summary"):].splitlines()
    expected = printed_lines(summary)  # the kept line goes on with the selector's budget (words, no other number)
    assert [printed[1], printed[2][:len(expected[1])], printed[4]] == expected, "summary.json's numbers, rounded"
    assert printed[3].startswith(f"rollouts took {summary['rollout_share']:.1%} of training wall time (synchronous")
    assert 0 < summary["rollout_seconds"] < summary["train_seconds"] and summary["max_staleness"] == 0
    assert f"summary (JSON) in {path}" in printed
    assert not list(path.parent.glob(".summary.json*")), "no partial file left"


def printed_lines(summary: dict) -> list[str]:
    """The numbers `opdlab fit` prints at the end, made here from summary.json's values (full precision there)."""
    return [f"steps: {summary['steps']}   training wall time: {summary['train_seconds']:.1f} s   response tokens/s: "
            f"{summary['response_tokens_per_second']:.0f}",
            f"trained on {summary['kept_token_share']:.1%} of {summary['response_tokens']} sampled response tokens",
            f"student accuracy: before {summary['accuracy_before']:.1%} -> after {summary['accuracy_after']:.1%}   "
            f"(teacher {summary['teacher_accuracy']:.1%})"]


def test_printed_summary_and_summary_json_are_one_reading(tmp_path):
    """Numbers near a rounding edge (1.9504 s prints 2.0; rounding the JSON first to 1.95 printed 1.9): the print
    rounds the very value summary.json holds, once, and the JSON keeps it whole."""
    from types import SimpleNamespace

    from opdlab.callbacks import FitSummary

    summary = FitSummary()
    summary.before, summary.accuracy, summary.accuracy_step, summary.teacher = 0.12345, 0.31250, 4, 0.9
    summary.seconds, summary.response_tokens, summary.kept_tokens, summary.steps_here = 1.9504, 1025, 512, 4
    trainer = SimpleNamespace(log_dir=str(tmp_path), default_root_dir=str(tmp_path), is_global_zero=True,
                              fast_dev_run=False, global_step=4)
    path = summary.write(trainer)
    written = json.loads(path.read_text())
    assert written == summary.reading and written["train_seconds"] == 1.9504  # full precision in the file
    assert written["response_tokens_per_second"] == 1025 / 1.9504
    without_rollouts = [line for line in summary.lines() if not line.startswith("rollouts took")]
    assert without_rollouts[:3] == printed_lines(written)  # no selector budget: the kept line ends there
    assert summary.lines()[0].startswith("steps: 4   training wall time: 2.0 s   response tokens/s: 526")
    summary.seconds, summary.accuracy = 99.0, 0.5  # changed after the last write: the print stays the file's
    assert [line for line in summary.lines(4) if not line.startswith("rollouts took")][:3] == printed_lines(written)


def test_summary_validations_survive_a_resume():
    from opdlab.callbacks import FitSummary

    first = FitSummary()
    first.before, first.validations = 0.25, [(0, 0.25), (10, 0.5)]
    resumed = FitSummary()
    resumed.load_state_dict(first.state_dict())
    assert resumed.before == 0.25 and resumed.validations == [(0, 0.25), (10, 0.5)]
    resumed.load_state_dict({"before": 0.25})  # a checkpoint from before summary.json
    assert resumed.validations == [(0, 0.25), (10, 0.5)]
    assert FitSummary().as_dict(0)["accuracy_after"] is None  # no NaN in JSON


# ------------------------------------------------------------------------------ plot layout
@pytest.fixture
def figures(monkeypatch):
    """Every figure the plot functions save, kept (after its PNG is written) for measuring."""
    from opdlab.diagnostics import plots

    kept = []
    save = plots.save_figure

    def keep(fig, path, title=None):
        save(fig, path, title)
        kept.append((fig, Path(path)))

    monkeypatch.setattr(plots, "save_figure", keep)
    return kept


def drawn_texts(fig) -> dict[str, list]:
    """The texts a reader sees, by role, after drawing at the saved resolution (120 dpi)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)  # the figure was closed after saving: a fresh canvas to draw it on
    fig.set_dpi(120)
    fig.canvas.draw()

    def shown(texts):
        return [t for t in texts if t.get_visible() and t.get_text().strip()]

    def tick_labels(axis):  # those of ticks within the view (matplotlib keeps a label for each tick it made)
        low, high = sorted(axis.get_view_interval())
        span = (high - low) * 1e-6
        return shown([t.label1 for t in axis.get_major_ticks() if low - span <= t.get_loc() <= high + span])

    roles = {"suptitle": shown([fig._suptitle] if fig._suptitle is not None else [])}
    for i, ax in enumerate(fig.axes):
        roles[f"axes{i} titles"] = shown([ax.title, ax._left_title, ax._right_title])
        roles[f"axes{i} axis labels"] = shown([ax.xaxis.label, ax.yaxis.label])
        roles[f"axes{i} x ticks"] = tick_labels(ax.xaxis)
        roles[f"axes{i} y ticks"] = tick_labels(ax.yaxis)
        legend = ax.get_legend()
        roles[f"axes{i} legend"] = shown(legend.get_texts()) if legend is not None else []
    return roles


def check_layout(fig, path: Path) -> None:
    assert path.is_file() and path.stat().st_size > 0
    roles = drawn_texts(fig)
    renderer = fig.canvas.get_renderer()
    figure_box = fig.bbox
    boxes = {role: [(t.get_text(), t.get_window_extent(renderer)) for t in texts] for role, texts in roles.items()}
    for role, items in boxes.items():
        for text, box in items:
            inside = (box.x0 >= figure_box.x0 - 0.5 and box.x1 <= figure_box.x1 + 0.5
                      and box.y0 >= figure_box.y0 - 0.5 and box.y1 <= figure_box.y1 + 0.5)
            assert inside, f"{path.name}: {role} {text!r} at {box.extents} is outside the figure {figure_box.extents}"
    everything = [(role, text, box) for role, items in boxes.items() for text, box in items if "legend" not in role]
    for (role_a, a, box_a), (role_b, b, box_b) in itertools.combinations(everything, 2):
        assert not box_a.overlaps(box_b), f"{path.name}: {role_a} {a!r} overlaps {role_b} {b!r}"
    assert any(boxes[r] for r in boxes if "ticks" in r)


def realistic_gain_statistics():
    """`gain_statistics` (what `opdlab diagnose` plots) over a synthetic bank with every feature column."""
    from opdlab.diagnostics.report import PREDICTORS, RAW_MODEL, TEACHABILITY_MODEL, StatsOptions, gain_statistics

    rng = np.random.default_rng(0)
    n = 600
    table = {name: rng.random(n) for name in {*PREDICTORS, *RAW_MODEL, *TEACHABILITY_MODEL}}
    table.update(context=np.repeat(np.arange(60), 10), included=np.ones(n, dtype=bool),
                 forward_gain=rng.normal(size=n), reverse_gain=rng.normal(size=n))
    return gain_statistics(table, StatsOptions(bootstrap=50))


def test_diagnose_plots_keep_labels_apart_and_inside(figures, tmp_path):
    from opdlab.diagnostics.report import write_plots

    label = "/home/someone/runs/long_toy/teachability_r0.05/version_12/student -> θ1"  # as `opdlab diagnose` names it
    written = write_plots(realistic_gain_statistics(), tmp_path, label)
    assert [p.name for _, p in figures] == written == ["deciles.png", "terciles.png", "coefficients.png"]
    for fig, path in figures:
        check_layout(fig, path)
    terciles = {p.name: f for f, p in figures}["terciles.png"]
    names = [t.get_text() for t in terciles.axes[0].get_yticklabels()]
    assert names[:2] == ["disagreement", "topk_entropy"], names  # the predictors read top to bottom, in order


def test_compare_plots_keep_labels_apart_and_inside(figures, tmp_path):
    from opdlab.compare import RunResult, RunSpec, summarize, write_outputs

    def run(selector, ratio, seed):
        rng = np.random.default_rng(seed)
        acc = np.clip(np.linspace(0.1, 0.6, 11) + rng.normal(0, 0.03, 11), 0, 1).tolist()
        kept = 5000.0 * ratio
        return RunResult(RunSpec(selector, ratio, seed), ok=True, val_steps=list(range(0, 201, 20)), val_accuracy=acc,
                         kept_tokens=kept * 200, valid_tokens=5000.0 * 200, fit_seconds=600.0,
                         val_supervised_tokens=[kept * s for s in range(0, 201, 20)])

    main = [RunSpec(s, 1.0 if s == "full" else r, seed) for seed in (0, 1, 2) for r in (0.05, 0.1)
            for s in ("full", "random", "entropy", "divergence", "teachability")]
    main = list(dict.fromkeys(main))
    sweep = [RunSpec(s, r, seed) for seed in (0, 1, 2) for s in ("teachability", "random")
             for r in (0.01, 0.05, 0.1, 0.3, 1.0)]
    specs = list(dict.fromkeys(main + sweep))
    results = {s: run(s.selector, s.ratio, s.seed) for s in specs}
    write_outputs(tmp_path, results, main, sweep, summarize([results[s] for s in main]),
                  summarize([results[s] for s in sweep]), header="command: `opdlab compare ...`",
                  label="long_toy.yaml, long_toy_teachability_experiment_overrides.yaml")
    assert sorted(p.name for _, p in figures) == ["accuracy_vs_step.png", "accuracy_vs_tokens.png",
                                                  "sweep_vs_step.png", "sweep_vs_tokens.png"]
    for fig, path in figures:
        check_layout(fig, path)


# ------------------------------------------------------------------------------ the stage trace
STAGES = ["rollout", "forward", "score", "select", "loss", "optimizer"]


def test_fit_writes_a_trace_of_every_steps_stages(redirected_fit):
    """trace.json beside summary.json: Chrome/Perfetto complete events, one per stage of each of the 3 steps, inside
    their step's event, in order, plus one per validation during the fit; the file is a closed JSON array."""
    root, _ = redirected_fit
    (path,) = root.glob("*/*/trace.json")
    events = json.loads(path.read_text())
    steps = [e for e in events if e["name"].startswith("step ")]
    assert [e["args"]["step"] for e in steps] == [1, 2, 3]  # numbered from 1, as the logged "step"
    for step in steps:
        stages = [e for e in events if e["ph"] == "X" and e.get("args", {}).get("step") == step["args"]["step"]
                  and e["name"] in STAGES]
        assert [e["name"] for e in stages] == STAGES
        assert all(e["dur"] >= 0 and step["ts"] <= e["ts"] and e["ts"] + e["dur"] <= step["ts"] + step["dur"] + 1
                   for e in stages)
        assert [e["ts"] for e in stages] == sorted(e["ts"] for e in stages)
    # the validation inside the fit (after step 2); the ones before and after it run outside the fit
    assert [e["args"]["step"] for e in events if e["name"] == "validation"] == [2]


def test_a_trace_cut_short_keeps_its_finished_steps_and_a_resume_continues_it(tmp_path):
    """A run that ends without its closing bracket (killed) is still read event by event, and the next fit in the
    same folder continues the array."""
    from types import SimpleNamespace

    from opdlab.callbacks.trace import StageTrace

    trainer = SimpleNamespace(log_dir=str(tmp_path), logger=object(), fast_dev_run=False, global_rank=0, global_step=1)
    record = SimpleNamespace(spans=[("rollout", 10.0, 0.5), ("loss", 10.5, 0.25)])
    first = StageTrace()
    first.on_fit_start(trainer, None)
    first.on_train_batch_end(trainer, None, {"record": record}, None, 0)
    first.file.close()  # killed: no closing bracket
    cut = (tmp_path / "trace.json").read_text()
    assert json.loads(cut.rstrip().removesuffix(",") + "]")[-1]["name"] == "loss"
    second = StageTrace()
    second.on_fit_start(trainer, None)
    trainer.global_step = 2
    second.on_train_batch_end(trainer, None, {"record": record, "loss": 0.0}, None, 0)
    second.close()
    events = json.loads((tmp_path / "trace.json").read_text())
    assert [e["args"]["step"] for e in events if e["name"].startswith("step ")] == [2, 2]  # skipped, then stepped
