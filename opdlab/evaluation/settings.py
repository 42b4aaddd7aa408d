"""The evaluation settings on a command line, shared by `opdlab eval --config` and `opdlab fit --eval`: each
settings file checked before jsonargparse reads it (`check_config_files`), and a list of benchmarks given on the
command line replacing the file's (`replacing_lists`). Also how a value is named in a one-line message
(`json_kind`, `short`)."""

from __future__ import annotations

from pathlib import Path

from opdlab.evaluation.options import EvalError


def check_config_files(argv: list[str], option: str = "--config") -> None:
    """Each `option` file (`opdlab eval --config`, `opdlab fit --eval`) exists and holds a YAML mapping of evaluation
    settings, or is refused in one line naming it (jsonargparse would print its usage and the file's content, or
    only "Unexpected config")."""
    import yaml

    for i, arg in enumerate(argv):
        if arg == option and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(option + "="):
            value = arg.partition("=")[2]
        else:
            continue
        example = f"e.g. {option} configs/eval/toy.yaml"
        path = Path(value).expanduser()
        if not path.exists():
            if value.lstrip().startswith("{"):
                continue  # settings given inline: jsonargparse reads them
            raise EvalError(f"{option} {value} not found; pass an evaluation settings file, {example}")
        if not path.is_file():
            raise EvalError(f"{option} {value} is a folder; pass an evaluation settings file, {example}")
        try:
            data = yaml.safe_load(path.read_text())
        except (yaml.YAMLError, UnicodeDecodeError) as err:
            mark = getattr(err, "problem_mark", None)
            where = f" (line {mark.line + 1})" if mark is not None else ""
            reason = getattr(err, "problem", None) or " ".join(str(err).split())[:120]
            raise EvalError(f"{option} {value} is not valid YAML{where}: {reason}") from None
        if data is None:
            raise EvalError(f"{option} {value} is empty (no settings in it); pass an evaluation settings file, {example}")
        if not isinstance(data, dict):
            kind = "a list" if isinstance(data, list) else f"a single value ({short(data)})"
            raise EvalError(f"{option} {value}: the top level must be a mapping of evaluation settings (k: 8, "
                            f"benchmarks: [...], ...), but it is {kind}; see configs/eval/toy.yaml")


def json_kind(value: object) -> str:
    """What a JSON value is, in JSON's words: 'null', 'a JSON array', 'a JSON string', ..."""
    names = {type(None): "null", list: "a JSON array", str: "a JSON string", bool: "a JSON boolean",
             int: "a JSON number", float: "a JSON number", dict: "a JSON object"}
    return names.get(type(value), f"a JSON {type(value).__name__}")


def replacing_lists(argv: list[str], key: str) -> list[str]:
    """`key` (a list of benchmark entries) given on the command line replaces the config file's list: jsonargparse
    would merge the two entry by entry, so a config's `limit: 32` silently stayed on a benchmark the command line
    named. An empty list first makes it a replacement (`key+` still appends)."""
    out: list[str] = []
    for arg in argv:
        if arg == key or arg.startswith(key + "="):
            out += [key, "[]"]
        out.append(arg)
    return out


def short(value: object) -> str:
    """A value as a one-line message shows it: a fingerprint's first 12 hex digits, anything else cut at 80
    characters."""
    if isinstance(value, str) and value.startswith("sha256:"):
        return repr(value.removeprefix("sha256:")[:12])
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
