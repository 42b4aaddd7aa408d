"""What opdlab's commands print besides their results: the one-line error format, the traceback switch, and the
Lightning messages that say nothing about an opdlab run. Every command imports this small module (and nothing
here imports the commands), so there is one place for each."""

from __future__ import annotations

import functools
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NoReturn

TRACEBACK_ENV = "OPDLAB_TRACEBACK"


class OpdlabError(Exception):
    """A problem with the user's input (an option, a file, a folder, a plugin) that opdlab states in one line.
    Raise it (or a subclass) anywhere; `opdlab.cli.main` prints it with `error_exit`."""


def traceback_wanted() -> bool:
    """OPDLAB_TRACEBACK=1 (anything but empty or 0): show tracebacks instead of one-line errors."""
    return os.environ.get(TRACEBACK_ENV, "").strip() not in ("", "0")


def error_line(message: object, prog: str = "opdlab") -> str:
    """`<prog>: error: <message>` on one line (whitespace and line breaks of the message collapsed)."""
    return f"{prog}: error: {' '.join(str(message).split())}"


def error_exit(message: object, prog: str = "opdlab", code: int = 1, hint: str | None = None) -> NoReturn:
    """Print the one-line error (and a hint line: by default, how to see the traceback) and exit with `code`."""
    hint = f"(set {TRACEBACK_ENV}=1 to see where it was raised)" if hint is None else hint
    text = error_line(message, prog) + (f"\n{hint}" if hint else "")
    if code == 1:
        sys.exit(text)  # Python prints it to stderr; callers in-process read it from SystemExit.code
    sys.stderr.write(text + "\n")
    raise SystemExit(code)


def refuse_in_one_line(parser, message: str, ex: Exception | None, default) -> None:
    """A jsonargparse parser's `error`: one `<prog>: error: ...` line (exit 2) with the closest known option names
    for a mistyped one and the command's --help, instead of the usage of every option then jsonargparse's nested
    text. A nested parser (a class's init_args) raises instead (`default`, jsonargparse's own `error`), so the
    parser that called it names the whole option; with OPDLAB_TRACEBACK=1, jsonargparse's own behaviour."""
    if not parser.exit_on_error:
        return default(message, ex)
    hints = closest_keys_hint(message, parser)
    if traceback_wanted():
        return default(message + hints, ex)
    prog = parser.prog.replace(" [options]", "")
    error_exit(parser_error_line(message), prog, code=2,
               hint="\n".join(filter(None, [hints.strip(), f"run '{prog} --help' for every option"])))


@functools.cache
def one_line_parser_class():
    """jsonargparse's ArgumentParser refusing in one line (`refuse_in_one_line`): the parser_class of the commands
    built with jsonargparse.CLI (eval, compare, diagnose, toy). `opdlab fit`'s parser does the same. One class
    (cached): jsonargparse caches the parsers of nested classes per parser class."""
    from jsonargparse import ArgumentParser

    class OneLineArgumentParser(ArgumentParser):
        def error(self, message: str, ex: Exception | None = None):
            return refuse_in_one_line(self, message, ex, super().error)

    return OneLineArgumentParser


def closest_keys_hint(message: str, parser) -> str:
    """' Did you mean ...?' for the unknown keys named in a jsonargparse error message, else ''."""
    import re

    unknown = re.findall(r"--([\w.]+)", message.partition("unrecognized arguments:")[2])
    for group, option in re.findall(r"Group '([\w.]+)' does not accept option '([\w]+)", message):
        unknown.append(f"{group}.{option}")
    unknown += re.findall(r"Key '([\w.]+)' is not expected", message)
    known = sorted(set(option_keys(parser)))
    hints = []
    for key in unknown:
        close = closest(key, known)
        same_group = [c for c in close if c.split(".")[0] == key.split(".")[0]]
        close = same_group or close  # `model.max_new_token`: model.rollout.max_new_tokens, not eval.max_new_tokens
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


JSONARGPARSE_SCAFFOLDING = ("Does not validate against", "Subtypes:", "Errors:", "Given value", "- Expected a <class 'NoneType'>")


def parser_error_line(message: object) -> str:
    """jsonargparse's refusal of an option or config value, on one line that names the whole option (a class's
    init_args included, where jsonargparse names only `lr`) and says what it takes:

    - a value of the wrong type: `--model.optimizer.init_args.lr: expected float or Tensor, got 'nan'`;
    - an option the class does not take: `--model.selector.init_args.rati: TeachabilitySelector takes no option
      'rati' (did you mean 'ratio'?)`;
    - a class_path that does not import, or a group given one value (`--model.rollout null`).

    Only where the message is unambiguous: one class involved and at most one key inside it. Where jsonargparse
    tried several classes or nested ones (a list of callbacks, a strategy's cluster environment), which branch
    failed for which reason cannot be told apart here, and a wrong line is worse than an unclear one: the line is
    then jsonargparse's first line, plus the reason when that line only names the key."""
    import re

    text = str(message)
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if not lines:
        return text
    keys = list(dict.fromkeys(re.findall(r'Parser key "([\w.]+)"', text)))
    owners = set(re.findall(r"Problem with given class_path '([\w.]+)':", text))
    if "expects a function or a callable class" in text:  # the optimizer's and scheduler's type
        owners |= set(re.findall(r"class_path='([\w.]+)'", text))
    unknown = set(re.findall(r"Option '(\w+)' is not accepted", text))
    leaf = re.findall(r"Expected a (<class '[\w.]+'>|typing\.Literal\[.*?\])\. Got value: (.*)", text)
    if keys and len(owners) <= 1 and len(keys) <= 1 + len(owners) and len(unknown) + bool(leaf) <= 1:
        owner = next(iter(owners), None)
        # a subclass's options sit under init_args (--model.selector.init_args.ratio), a dataclass's do not
        joiner = ".init_args." if owner and not is_dataclass_path(owner) else "."
        group, option = "--" + keys[0], "--" + joiner.join(keys)
        if owner and unknown:
            word = next(iter(unknown))
            return (f"{group}{joiner}{word}: {owner.rsplit('.', 1)[-1]} takes no option {word!r}"
                    + closest_words(word, [n for n in init_arg_names(owner) if n != word]))
        missing = re.search(r"(module '[\w.]+' has no attribute '\w+'|No module named '[\w.]+')", text)
        if owner and missing:
            return f"{group}: class_path {owner!r} does not import ({missing[1]}); check its spelling"
        unloadable = re.search(r"Unable to load config (['\"])(.*?)\1", text)
        if unloadable and len(keys) == 1:
            return (f"{group}: {unloadable[2]!r} is not a value this group of options takes; set its options one by one "
                    f"({group}.<option> VALUE) or leave it out for the defaults")
        if leaf:  # one type: int, float, str, a Literal
            kind, value = leaf[-1][0], leaf[-1][1].split(". Got value:")[0].strip()
            literal = re.match(r"typing\.Literal\[(.*)\]$", kind)
            return wrong_type(option, [f"one of {literal[1]}" if literal else type_name(kind[8:-2])], value)
        inner = text[text.rfind("Subtypes:"):]  # the innermost union: several types (float or None), none took it
        union, given = re.match(r"Subtypes: \[(.*)\]", inner), re.search(r"Given value: (.*)", inner)
        value = given[1].split(". Got value:")[0].strip() if union and given else ""
        if value and not value.startswith("NestedArg") and not unknown:
            types = [type_name(a or b) for a, b in re.findall(r"<class '([\w.]+)'>|([\w.]+\[[\w.]+\])", union[1])]
            return wrong_type(option, types, value)
    if not lines[0].endswith(":"):
        return lines[0]
    reasons = [line.lstrip("- ") for line in lines[1:] if not line.startswith(JSONARGPARSE_SCAFFOLDING)]
    given = next((line.removeprefix("Given value:").strip() for line in lines if line.startswith("Given value:")), None)
    shown = " ".join([lines[0], *reasons[:2]])
    if given is not None and "Got value" not in shown and "NestedArg" not in given and len(given) < 80:
        shown += f" (got {given!r})"  # say which value
    return shown


def wrong_type(option: str, types: list[str], value: str) -> str:
    """`--k: expected int, got 'many'`; where a list of numbers was meant and one number given, how to write one."""
    import re

    types = sorted(types, key=lambda t: (t == "null", t.lower()))  # one order: jsonargparse 4.48 and 4.53 differ
    numbers = any(t in ("list", "list[int]", "list[float]") for t in types)
    listed = numbers and re.fullmatch(r"[-+]?\d+(\.\d*)?([eE][-+]?\d+)?", value) is not None
    return (f"{option}: expected {' or '.join(types)}, got {value!r}"
            + (f" (a list is written in brackets: {option} '[{value}]')" if listed else ""))


def type_name(qualified: str) -> str:
    """'float' for float, 'null' for NoneType, 'Tensor' for torch.Tensor, 'list[Benchmark]' for
    list[opdlab.eval_cli.Benchmark]: the names a config file's writer knows."""
    import re

    return "null" if qualified == "NoneType" else re.sub(r"(?:[a-z_]\w*\.)+([A-Za-z_]\w*)", r"\1", qualified)


def is_dataclass_path(class_path: str) -> bool:
    """Whether a class_path names a dataclass (whose options are not under init_args)."""
    import dataclasses

    return dataclasses.is_dataclass(imported(class_path))


def init_arg_names(class_path: str) -> list[str]:
    """The parameters a class's constructor takes (its init_args), or [] where it does not import."""
    import inspect

    try:
        return [p for p in inspect.signature(imported(class_path)).parameters if p != "self"]
    except (TypeError, ValueError):  # not a class (None: it did not import), or no signature to read
        return []


def imported(class_path: str) -> object | None:
    """The object a dotted path names, or None where it does not import (these only shape a message)."""
    import importlib

    module, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except Exception:  # noqa: BLE001 -- any import failure: no object, and the message says less
        return None


def closest(word: str, known: list[str]) -> list[str]:
    """The (up to three) known words closest to a mistyped one."""
    import difflib

    return difflib.get_close_matches(word, known, n=3, cutoff=0.6)


def closest_words(word: str, known: list[str]) -> str:
    """' (did you mean 'a' or 'b'?)' for the known words closest to a mistyped one, else ''."""
    close = closest(word, known)
    return f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""


@contextmanager
def stop_signals() -> Iterator[list[int]]:
    """While the block runs, SIGINT (Ctrl-C) and SIGTERM (a scheduler's stop) both raise KeyboardInterrupt, so the
    command can say what it kept and how to continue; without it SIGTERM ends the process with no word. Yields
    the signals received, the first being the one to report (a second one only stops sooner). The previous
    handlers are back when the block ends. Outside the main thread (where handlers cannot be set) a no-op."""
    import signal
    import threading

    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def handle(signum, frame):
        received.append(signum)
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def signal_name(signum: int) -> str:
    """'Ctrl-C' for SIGINT, else the signal's name (SIGTERM)."""
    import signal

    return "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name


def transformers_bars_only_on_a_terminal() -> None:
    """transformers' "Loading weights" / "Writing model shards" bars: on a terminal as they are; in a log file
    (CI, a scheduler's output) they would be lines of carriage returns, so they are turned off there."""
    if not sys.stderr.isatty():
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def drop_advertising(record: logging.LogRecord) -> bool:
    """Lightning's tip to install a cloud logger, printed at every fit, and its note that the module's own callback
    (`TeacherLifetime`, which closes the teacher) replaces the one an earlier validation attached: not ours to pass on."""
    message = record.getMessage()
    return "litlogger" not in message and "callbacks returned in `LightningModule.configure_callbacks`" not in message


def silence_lightning_noise() -> None:
    """Lightning's messages that say nothing about an opdlab run (every command that trains calls this)."""
    # The frozen teacher is in eval mode on purpose; Lightning warns about it at every fit.
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    # Validation metrics are torchmetrics metrics, which sync across ranks when computed; Lightning asks for
    # sync_dist as soon as a process group exists (the vllm engine makes one even in a single process).
    warnings.filterwarnings("ignore", message=r"It is recommended to use `self.log\('val/")
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(drop_advertising)


def error_summary(err: BaseException, limit: int = 600) -> str:
    """`Type: message` of an error on one line (whitespace folded, the message cut at `limit` characters)."""
    return f"{type(err).__name__}: {' '.join(str(err).split())[:limit]}"
