"""Command-line entry points: one-line errors, `--debug`, and a `--help` that exits 0.

Every `python -m ...` script of the project ends with one line. An absl script
(`eval.*`, `train.*`) whose `define_flags()` registers its flags:

    if __name__ == "__main__":
        cli.run(main, define_flags)        # instead of: define_flags(); app.run(main)

Register the flags in that function, not at import: config_flags applies the
command line's `--config.*` overrides while it defines a config flag, so an
unknown field would fail there, before `cli.run` can report it.

An argparse script (`hybridvlm.convert`) builds its parser with `cli.ArgumentParser`
and ends with `cli.run_argparse(main)`.

What a script gets:

- An expected error prints ONE line, `error: <what>: <reason>`, on stderr, with
  exit status 2 for a usage error (unknown flag or config field, a bad flag or
  field value: `UsageError`, absl flag errors) and 1 for the rest (a missing or
  unreadable file, a bad video or checkpoint, an invalid config, an impossible
  plan: `EXPECTED`). `--debug` re-raises instead, for the full traceback.
  Anything else is a bug and keeps its traceback.
- `--config.<field>` overrides are checked against the config before anything
  runs: an unknown field, or a field whose value is None and has no type (use
  `ml_collections.config_dict.placeholder(type)`), is a usage error naming it.
- `--help` (`-h`, `-?`, `--helpshort`; `--helpfull` with absl's own flags)
  prints the docstring, the script's flags and every config field that can be
  overridden (`--config.<field>  <type>  <default>`), and exits 0.
- Logging stays at WARNING unless `--verbosity` says otherwise. (absl's
  `app.run` raises it to INFO, which made every CPU run print JAX's INFO-level
  note "Unable to initialize backend 'tpu'" from probing for libtpu; the
  backend choice is untouched, and a failing accelerator still warns.)

Scripts validate their inputs (files, videos, checkpoints, outputs, value
ranges: `hybridvlm.cli_checks`) in `main` before they build a model, so a bad
path fails in about the time it takes to import JAX.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Any, Callable, NoReturn, Sequence

from absl import app, flags
from ml_collections import config_dict
from ml_collections.config_flags.config_flags import ConfigFileFlagParser

from hybridvlm.config import ConfigError
from hybridvlm.hf_import import CheckpointError
from hybridvlm.video import VideoError
from reduction.plan import PlanError

FLAGS = flags.FLAGS

# A usage error: the command line itself is wrong (exit status 2).
UsageError = app.UsageError


class InputError(Exception):
    """A file, directory or value named on the command line cannot be used (exit status 1).

    The message names the flag and the file: "--video: clip.mp4: no such file".
    """


# Errors a user can cause with a well-formed command line (exit status 1): the
# project's own input errors (all "<what>: <reason>") and the operating system's.
EXPECTED: tuple[type[BaseException], ...] = (InputError, OSError, ConfigError, CheckpointError, VideoError, PlanError)
USAGE: tuple[type[BaseException], ...] = (UsageError, flags.Error)

HELP_SHORT = ("-h", "-?", "--help", "-help", "--helpshort", "-helpshort")
HELP_FULL = ("--helpfull", "-helpfull")
DEBUG_HELP = "On an error, show the full Python traceback instead of one line."
# absl's WARNING verbosity (its default before app.run raises it to INFO).
WARNING = -1


# ----------------------------------------------------------------------------- errors


def exit_status(error: BaseException) -> int | None:
    """2 for a usage error, 1 for another expected error, None for a bug (keeps its traceback)."""
    if isinstance(error, USAGE):
        return 2
    if isinstance(error, EXPECTED):
        return 1
    return None


def describe(error: BaseException) -> str:
    """The error as one line, "<what>: <reason>"."""
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        what = f"{error.filename} -> {error.filename2}" if error.filename2 is not None else f"{error.filename}"
        return f"{what}: {error.strerror}"
    if isinstance(error, flags.UnrecognizedFlagError):
        hint = str(error).partition("Did you mean:")[2].strip(" ?")
        return f"--{error.flagname}: unknown flag" + (f" (did you mean --{hint}?)" if hint else "")
    text = str(error)
    if isinstance(error, flags.IllegalFlagValueError):
        text = text.removeprefix("flag ")  # absl's "flag --name=value: reason"
    return " ".join(text.split()) or type(error).__name__


def report(fn: Callable[[], Any], *, debug: bool) -> Any:
    """fn(); an expected error becomes one line on stderr and its exit status (re-raised with debug)."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 -- sorted by exit_status; the rest re-raised
        status = exit_status(e)
        if status is None or debug:
            raise
        sys.stderr.write(f"error: {describe(e)}\n")
        sys.stderr.flush()
    sys.exit(status)


def debug_requested(argv: Sequence[str]) -> bool:
    """Whether argv turns on --debug (read before parsing, so even a parse error can show its traceback)."""
    debug = False
    for arg in _options(argv):
        name, _, value = arg.lstrip("-").partition("=")
        if name == "debug":
            debug = value.lower() not in ("false", "0", "no") if value else True
        elif name == "nodebug":
            debug = False
    return debug


def _options(argv: Sequence[str]) -> list[str]:
    """The arguments before a "--" terminator, program name excluded."""
    args = list(argv[1:])
    return args[: args.index("--")] if "--" in args else args


# ----------------------------------------------------------------------------- absl scripts


def run(main: Callable[[list[str]], Any], define_flags: Callable[[], None] | None = None,
        argv: Sequence[str] | None = None) -> NoReturn:
    """Runs an absl script's `main` as `app.run` would, with the behaviour of the module docstring.

    Order: flags defined; --help answered; --config.* overrides checked; flags
    parsed (absl's errors become one line, status 2); main(argv), whose
    expected errors become one line (status 1, or 2 for UsageError).
    define_flags: registers the script's flags (called here, see the module docstring).
    argv: default sys.argv.
    """
    argv = list(sys.argv if argv is None else argv)
    debug = debug_requested(argv)
    if "debug" not in FLAGS:
        flags.DEFINE_bool("debug", False, DEBUG_HELP)
    report(lambda: _define(define_flags, argv[:1]), debug=debug)
    options = _options(argv)
    if any(a in HELP_SHORT + HELP_FULL for a in options):
        print_help(argv, full=any(a in HELP_FULL for a in options))
        sys.exit(0)
    argv = report(lambda: prepare_config_overrides(argv), debug=debug)
    # config_flags reads the overrides from sys.argv when it parses --config.
    sys.argv = argv
    app.run(lambda args: report(lambda: main(args), debug=debug), argv=argv,
            flags_parser=lambda args: report(lambda: _parse(args), debug=debug))
    raise AssertionError("app.run returned")  # it always exits


def _define(define_flags, argv0: list[str]) -> None:
    """Registers the flags with sys.argv hidden: config_flags would otherwise apply the
    command line's overrides while loading the default config, where an unknown field is
    an AttributeError. `prepare_config_overrides` checks them instead."""
    if define_flags is None:
        return
    saved = sys.argv
    sys.argv = argv0
    try:
        define_flags()
    finally:
        sys.argv = saved


def _parse(argv: list[str]) -> list[str]:
    rest = FLAGS(argv)
    if FLAGS["verbosity"].using_default_value:
        FLAGS.verbosity = WARNING  # marks it set, so app.run does not raise it to INFO
    return rest


# ----------------------------------------------------------------------------- config overrides


def config_flag_names() -> list[str]:
    """Names of the registered config-file flags (`config_flags.DEFINE_config_file`, e.g. ["config"]).

    Only config files are supported: their overrides are checked and applied
    by re-reading the file (see `prepare_config_overrides`).
    """
    return [name for name in FLAGS if isinstance(FLAGS[name].parser, ConfigFileFlagParser)]


def prepare_config_overrides(argv: list[str]) -> list[str]:
    """Checks every `--<config>.<field>` override against its config; returns the argv to parse.

    Raises UsageError for an unknown field or a field that cannot be set from
    the command line, InputError for a config file that cannot be loaded. When
    overrides are given without `--<config>`, the default file is named
    explicitly in front of them (config_flags registers override flags only
    while it parses that flag).
    """
    argv = list(argv)
    for name in config_flag_names():
        overrides = [a for a in _options(argv) if re.match(rf"^--?(no)?{re.escape(name)}\.", a)]
        given = _given_config_path(argv, name)
        if not overrides and given is None:
            continue
        path = given if given is not None else FLAGS[name].default_unparsed
        cfg = load_config(name, path)
        for arg in overrides:
            check_override(cfg, name, arg)
        registered = all(_override_name(a) in FLAGS for a in overrides)  # flags defined at import time
        if overrides and given is None and not registered:
            argv.insert(1, f"--{name}={path}")
        elif overrides and given is not None:
            # config_flags refuses an override that comes before the file it applies to:
            # name the file first, wherever the command line put it.
            argv = [argv[0], f"--{name}={given}"] + _without_flag(argv[1:], name)
    return argv


def _without_flag(args: list[str], name: str) -> list[str]:
    """args without `--<name>=V` / `--<name> V` (before a "--" terminator)."""
    out, i = [], 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            return out + args[i:]
        if re.match(rf"^--?{re.escape(name)}=", arg):
            i += 1
        elif re.match(rf"^--?{re.escape(name)}$", arg):
            i += 2
        else:
            out.append(arg)
            i += 1
    return out


def _override_name(arg: str) -> str:
    """"config.model.hidden_size" for "--config.model.hidden_size=64" (and "--noconfig.flag")."""
    name = arg.lstrip("-").split("=", 1)[0]
    return name[2:] if name.startswith("no") and name[2:] in FLAGS else name


def _given_config_path(argv: Sequence[str], name: str) -> str | None:
    """The value of --<name> on the command line (the last one), or None."""
    args, path = _options(argv), None
    for i, arg in enumerate(args):
        m = re.match(rf"^--?{re.escape(name)}(=(.*))?$", arg)
        if m:
            path = m.group(2) if m.group(1) else (args[i + 1] if i + 1 < len(args) else None)
    return path


def load_config(name: str, path: str) -> config_dict.ConfigDict:
    """The config of file `path` ("file.py" or "file.py:arg"), loaded as config_flags does."""
    file = path.split(":", 1)[0]
    if not os.path.isfile(file):
        raise InputError(f"--{name}: {file}: {'is a directory' if os.path.isdir(file) else 'no such file'}")
    try:
        cfg = FLAGS[name].parser.parse(path)
        cfg.keys()  # a file that failed to load raises here (config_flags defers the error)
    except Exception as e:  # noqa: BLE001 -- the file is user code: any failure means it cannot be loaded
        cause = e.__cause__ or e
        lines = str(cause).strip().splitlines()
        # config_flags re-raises a TypeError / ValueError of get_config() with the traceback as its
        # message; its last line is the original "Type: message".
        wrapped = isinstance(cause, (TypeError, ValueError)) and lines
        reason = lines[-1].strip() if wrapped else f"{type(cause).__name__}: {cause}"
        raise InputError(f"--{name}: {file}: cannot load the config ({' '.join(reason.split())})") from e
    if not isinstance(cfg, config_dict.ConfigDict):
        raise InputError(f"--{name}: {file}: get_config() returned {type(cfg).__name__}, not a ConfigDict")
    return cfg


def check_override(cfg: config_dict.ConfigDict, name: str, arg: str) -> None:
    """Raises UsageError unless `arg` (e.g. "--config.model.hidden_size=64") names a settable field."""
    flag = arg.lstrip("-").split("=", 1)[0]
    if flag.startswith(f"no{name}."):
        flag = flag[2:]  # --noconfig.some_bool
    path = flag.split(".", 1)[1]
    node, where = cfg, name
    parts = path.split(".")
    for i, part in enumerate(parts):
        if "[" in part:
            return  # indexed fields (a[0]): left to config_flags
        if not isinstance(node, config_dict.ConfigDict) or part not in node:
            fields = ", ".join(sorted(node.keys())) if isinstance(node, config_dict.ConfigDict) else "none"
            raise UsageError(f"--{flag}: unknown config field {part!r} in {where} (its fields: {fields})")
        if i == len(parts) - 1 and node.get_type(part) is type(None):
            raise UsageError(f"--{flag}: config field {where}.{part} is None without a type, so it cannot be "
                             "set from the command line (the config should use config_dict.placeholder(type))")
        node, where = node[part], f"{where}.{part}"


# ----------------------------------------------------------------------------- help


def print_help(argv: Sequence[str], *, full: bool = False) -> None:
    """The script's docstring, its flags and its overridable config fields, on stdout."""
    doc = (sys.modules["__main__"].__doc__ or f"USAGE: {argv[0]} [flags]").strip("\n")
    lines = [doc, "", "flags:", (FLAGS.get_help() if full else FLAGS.main_module_help()).rstrip()]
    lines += ["", f"  --[no]debug: {DEBUG_HELP}", "    (default: 'false')"]
    if not full:
        lines += ["  --helpfull: all flags, absl's logging and debugging ones included."]
    for name in config_flag_names():
        lines += [""] + config_help(argv, name)
    print("\n".join(lines))


def config_help(argv: Sequence[str], name: str) -> list[str]:
    """Lines listing every field of the --<name> config that the command line can override."""
    given = _given_config_path(argv, name)
    path = given if given is not None else FLAGS[name].default_unparsed
    try:
        cfg = load_config(name, path)
    except InputError as e:
        return [f"config fields: unavailable ({e})"]
    rows = [(f"--{name}.{field}", kind, default) for field, kind, default in config_fields(cfg)]
    width = max((len(r[0]) for r in rows), default=0)
    head = f"config fields of --{name}={_short(path)} (override with --{name}.FIELD=VALUE; type, default):"
    return [head] + [f"  {flag:<{width}}  {kind:<5}  {default}" for flag, kind, default in rows]


def _short(path: str) -> str:
    """path relative to the working directory when it lies below it."""
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


def config_fields(cfg: config_dict.ConfigDict, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted field, type name, default) of every leaf field, nested configs flattened."""
    out = []
    for key in sorted(cfg.keys()):
        value, kind = cfg[key], cfg.get_type(key)
        if isinstance(value, config_dict.ConfigDict):
            out += config_fields(value, f"{prefix}{key}.")
        elif kind is type(None):
            out.append((f"{prefix}{key}", "-", "None (no type: cannot be overridden)"))
        else:
            shown = "unset" if value is None else repr(value) if isinstance(value, (str, tuple)) else str(value)
            out.append((f"{prefix}{key}", kind.__name__, shown))
    return out


# ----------------------------------------------------------------------------- argparse scripts


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line usage errors (exit status 2) and a --debug flag."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_argument("--debug", action="store_true", help=DEBUG_HELP)

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"error: {' '.join(message.split())}\n")
        sys.exit(2)


def run_argparse(main: Callable[[list[str]], Any], argv: Sequence[str] | None = None) -> NoReturn:
    """sys.exit(main(args)) for an argparse script, with expected errors reported as one line."""
    args = list(sys.argv[1:] if argv is None else argv)
    sys.exit(report(lambda: main(args), debug=debug_requested(["prog", *args])))
