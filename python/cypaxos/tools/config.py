"""Configuration files: ``cypaxos serve --config FILE``, a TOML file of option values.

The file's keys are the command's long options without their dashes, its values
what the option takes::

    id = 1
    cluster = "1=10.0.0.1:7001,2=10.0.0.2:7001,3=10.0.0.3:7001"
    data-dir = "/var/lib/cypaxos"      # data_dir works too
    tick-ms = 10
    log-format = "json"

Nothing here lists the options: they are read off the subcommand's argparse parser,
so an option added to the command is a key of its file at once, with the same
checks.  A value's TOML type must fit the option (a string for a name or a path, an
integer for a count, true/false for a flag, an array for a repeatable option) and
then passes the option's own check, as if typed on the command line; an unknown key,
a value of the wrong type and a key given twice are refused with one line naming the
key and the file.  Options on the command line win over the file; the file wins over
the built-in defaults, and over defaults taken from the environment.

Use: `enable(parser)` once the subcommand's options are all added, then
`resolve(root_parser, args, argv)` after parsing.  `enable` makes the options marked
``required=True`` satisfiable from the file; `resolve` checks them.
"""
from __future__ import annotations

import argparse
import difflib
import sys
from typing import Any, Sequence

from ..errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = ["CONFIG_OPTION", "enable", "resolve", "load", "option_keys"]

CONFIG_OPTION = "--config"

_PARSER_DEST = "_config_parser"   # the Namespace attribute naming the subparser
_REQUIRED_ATTR = "_config_required"  # the subparser's deferred required actions

_TOML_TYPE_NAMES = {str: "a string", int: "an integer", float: "a float",
                    bool: "true or false", list: "an array", dict: "a table"}


def enable(parser: argparse.ArgumentParser) -> None:
    """Give `parser` (a subcommand's) a ``--config FILE`` option.

    Call it after the last ``add_argument``: options marked required become
    "required on the command line or in the file" (argparse would otherwise refuse
    a command line that leaves them to the file), and `resolve` checks them.
    """
    parser.add_argument(CONFIG_OPTION, metavar="FILE", default=None,
                        help="read option values from this TOML file: keys are the long "
                             "options without dashes (data-dir = \"/var/lib/cypaxos\"); "
                             "options on the command line win")
    required = [a for a in parser._actions if a.required and a.option_strings]
    if required:
        # Keep the usage line argparse would print with them required.
        usage = parser.format_usage().split(":", 1)[1].strip()
        parser.usage = usage.replace("%", "%%").replace(parser.prog, "%(prog)s", 1)
        for action in required:
            action.required = False
    setattr(parser, _REQUIRED_ATTR, required)
    parser.set_defaults(**{_PARSER_DEST: parser})


def resolve(root: argparse.ArgumentParser, args: argparse.Namespace,
            argv: Sequence[str] | None) -> argparse.Namespace:
    """`args` with the values of its subcommand's ``--config`` file merged in.

    `root.parse_args(argv)` made `args`.  If the subcommand was `enable`d and given
    a file, the file's values become the subcommand's defaults and `argv` is parsed
    again, so what the command line says wins.  Then every required option must
    have a value (exit 2 otherwise, like argparse).  ConfigError for a bad file.
    """
    parser = getattr(args, _PARSER_DEST, None)
    if parser is None:
        return args
    path = getattr(args, CONFIG_OPTION.lstrip("-").replace("-", "_"))
    if path is not None:
        parser.set_defaults(**load(path, parser))
        args = root.parse_args(argv)
    missing = [a for a in getattr(parser, _REQUIRED_ATTR)
               if getattr(args, a.dest, None) is None]
    if missing:
        parser.error("the following arguments are required: "
                     + ", ".join(_long_option(a) for a in missing)
                     + f" (on the command line or in {CONFIG_OPTION} FILE)")
    return args


def option_keys(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Every key a config file of `parser` may hold (dashed form) -> its action."""
    keys: dict[str, argparse.Action] = {}
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            continue
        for option in action.option_strings:
            if option.startswith("--") and option != CONFIG_OPTION:
                keys[option[2:]] = action
    return keys


def load(path: str, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """Read the TOML file at `path` against `parser`'s options: {dest: value}.

    Values are converted and checked as the command line's would be.  Raises
    ConfigError (one line naming the file, and the key if one is at fault).
    """
    try:
        with open(path, "rb") as f:
            document = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8 text") from None
    keys = option_keys(parser)
    values: dict[str, Any] = {}
    key_of: dict[str, str] = {}  # dest -> the key that set it
    for key, value in document.items():
        action = keys.get(key.replace("_", "-"))
        if action is None:
            near = difflib.get_close_matches(key.replace("_", "-"), list(keys), n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise ConfigError(f"config file {path}: unknown key {key!r}{hint}")
        if action.dest in key_of:
            raise ConfigError(f"config file {path}: {key!r} and {key_of[action.dest]!r} "
                              "set the same option")
        key_of[action.dest] = key
        values[action.dest] = _value(action, value, f"config file {path}: {key}")
    return values


def _long_option(action: argparse.Action) -> str:
    return next((o for o in action.option_strings if o.startswith("--")),
                action.option_strings[0])


def _type_name(value) -> str:
    if type(value) is bool:
        return "a boolean"
    for kind, name in _TOML_TYPE_NAMES.items():
        if type(value) is kind:
            return name
    return "a date or time" if hasattr(value, "isoformat") else type(value).__name__


def _value(action: argparse.Action, value, where: str):
    """A TOML value for `action`, as parsing the command line would have made it."""
    if isinstance(action, argparse.BooleanOptionalAction):
        return _expect_bool(value, where)
    if action.nargs == 0:  # store_true, store_false, store_const
        return action.const if _expect_bool(value, where) else action.default
    if isinstance(action, argparse._CountAction):
        if type(value) is not int or value < 0:
            raise ConfigError(f"{where} must be an integer >= 0, not {_type_name(value)}")
        return value
    if isinstance(action, argparse._AppendAction) or action.nargs in ("*", "+") or (
            isinstance(action.nargs, int) and action.nargs > 1):
        if type(value) is not list:
            raise ConfigError(f"{where} must be an array, not {_type_name(value)}")
        if action.nargs == "+" and not value:
            raise ConfigError(f"{where} must not be empty")
        return [_scalar(action, item, where) for item in value]
    return _scalar(action, value, where)


def _expect_bool(value, where: str) -> bool:
    if type(value) is not bool:
        raise ConfigError(f"{where} must be true or false, not {_type_name(value)}")
    return value


def _accepted_types(action: argparse.Action) -> tuple[type, ...]:
    declared = getattr(action.type, "config_types", None)
    if declared is not None:
        return tuple(declared)
    if action.type in (None, str):
        return (str,)
    if action.type is int:
        return (int,)
    if action.type is float:
        return (int, float)
    # A check of our own that documents no TOML type: give it the value's text, as
    # the command line would.
    return (str, int, float)


def _scalar(action: argparse.Action, value, where: str):
    accepted = _accepted_types(action)
    if type(value) not in accepted:  # exact types: a TOML true is no integer here
        wanted = " or ".join(dict.fromkeys(_TOML_TYPE_NAMES[t] for t in accepted))
        raise ConfigError(f"{where} must be {wanted}, not {_type_name(value)}")
    text = value if isinstance(value, str) else repr(value)
    if action.type is None:
        result = text
    else:
        try:
            result = action.type(text)
        except (argparse.ArgumentTypeError, TypeError, ValueError) as exc:
            raise ConfigError(f"{where}: {exc}") from None
    if action.choices is not None and result not in action.choices:
        choices = ", ".join(map(str, action.choices))
        raise ConfigError(f"{where}: {value!r} is not one of {choices}")
    return result
