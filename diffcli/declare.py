"""Flag: one option declared once, and what is made from it: the Typer parameter, the conversion of a jobs-file value
or of a pass-through token, the signature of a command."""

from __future__ import annotations

import inspect
import json
import math
from dataclasses import dataclass
from typing import Annotated, Callable, Optional

import typer

from diffcli.errors import UsageError
from diffcli.sweep import Values


@dataclass(frozen=True)
class Flag:
    """One option or argument: `kind` is int, float, str, bool, "bools" (a --x/--no-x switch that may stay unset),
    "texts" (repeatable) or "sweep" (one value or a comma list, read by `parser`)."""

    name: str  # the parameter name: the Job builder's key, and a jobs-file key
    flags: tuple  # ("--cfg",) or ("--model", "-m"); () for a positional argument
    kind: object
    default: object = None
    help: str = ""
    envvar: str | None = None
    min: float | None = None
    max: float | None = None
    parser: Callable | None = None  # "sweep": text -> sweep.Values
    metavar: str | None = None
    off: str | None = None  # the --no-x of a switch

    @property
    def long(self) -> str:
        return next((f for f in self.flags if f.startswith("--")), self.name.upper())

    def annotation(self):
        """The Annotated type Typer reads."""
        py = {int: int, float: float, str: str, bool: bool, "bools": bool, "texts": list[str], "sweep": Values}[self.kind]
        if not self.flags:
            return Annotated[py, typer.Argument(help=self.help, metavar=self.metavar)]
        decls = [f"{self.flags[0]}/{self.off}" if self.off else self.flags[0], *self.flags[1:]]
        options = dict(help=self.help, envvar=self.envvar, metavar=self.metavar)
        if self.parser:
            options["parser"] = self.parser
        if self.min is not None:
            options["min"] = self.min
        if self.max is not None:
            options["max"] = self.max
        typed = py if self.default is not None and self.kind != "bools" else Optional[py]
        return Annotated[typed, typer.Option(*decls, **options)]

    def convert(self, value, where: str):
        """A jobs-file value (JSON or CSV text) as this option's Python value; exit 2 naming the line and flag."""
        if value is None:
            return None
        if self.kind in (bool, "bools"):
            return _boolean(value, self.long, where)
        if self.kind == "texts":
            items = list(value) if isinstance(value, (list, tuple)) else [value]
            return [_text(item, self.name, where) for item in items]
        if self.kind == str:
            return _text(value, self.name, where)
        if isinstance(value, (dict, list, tuple)):
            raise UsageError(f"{where}: {self.long} takes one value, got {json.dumps(value)[:80]}")
        if isinstance(value, bool):
            raise UsageError(f"{where}: Invalid value for '{self.long}': {json.dumps(value)} is not a number")
        if self.kind == "sweep":
            try:
                return self.parser(str(value))
            except typer.BadParameter as exc:
                raise UsageError(f"{where}: Invalid value for '{self.long}': {exc.message}") from None
        return self._number(value, where)

    def _number(self, value, where: str):
        word = "integer" if self.kind is int else "float"
        try:
            number = self.kind(value) if not (self.kind is int and isinstance(value, float)) else None
        except (ValueError, OverflowError):
            number = None
        if number is None or (isinstance(number, float) and math.isnan(number)):
            raise UsageError(f"{where}: Invalid value for '{self.long}': {str(value)[:40]!r} is not a valid {word}.")
        if (self.min is not None and number < self.min) or (self.max is not None and number > self.max):
            span = f"{self.min:g}<=x" if self.min is not None else "x"
            span += f"<={self.max:g}" if self.max is not None else ""
            raise UsageError(f"{where}: Invalid value for '{self.long}': {number} is not in the range {span}.")
        return number


def _boolean(value, flag: str, where: str) -> bool:
    """JSON booleans, and CSV/text spellings of them."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise UsageError(f"{where}: {flag} must be true or false, got {value!r}")


def _text(value, name: str, where: str) -> str:
    """A text value (prompt, path, name) must be a string: `"prompt": 5` is refused, not made "5"."""
    if isinstance(value, str):
        return value
    raise UsageError(f"{where}: {name} must be a string, got {json.dumps(value)[:80]}")


def signature(options: dict[str, Flag]) -> inspect.Signature:
    """The function signature Typer reads: required arguments first, in declaration order otherwise."""
    params = [inspect.Parameter(flag.name, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                default=inspect.Parameter.empty if flag.default is None and not flag.flags else flag.default,
                                annotation=flag.annotation())
              for flag in options.values()]
    params.sort(key=lambda p: p.default is not inspect.Parameter.empty)  # (stable: arguments keep their order)
    return inspect.Signature(params)


def command(app: typer.Typer, name: str, options: dict[str, Flag], doc: str, context: bool = False, **settings):
    """Register `body(**values)` as the Typer command `name` taking exactly `options` (and, `context`, Typer's
    Context as `ctx`)."""

    def register(body: Callable) -> Callable:
        def handler(**values):
            return body(**values)

        handler.__name__ = name
        handler.__doc__ = doc
        handler.__signature__ = signature(options)
        if context:
            ctx = inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context)
            handler.__signature__ = handler.__signature__.replace(
                parameters=[ctx, *handler.__signature__.parameters.values()])
        handler.__annotations__ = {p.name: p.annotation for p in handler.__signature__.parameters.values()}
        app.command(name=name, **settings)(handler)
        return body

    return register


def lookup(options: dict[str, Flag]) -> dict[str, Flag]:
    """Every key a jobs file may use for these options: name, name-with-dashes, and the long flag without '--'."""
    keys = {}
    for flag in options.values():
        keys[flag.name] = keys[flag.name.replace("_", "-")] = flag
        for text in flag.flags:
            if text.startswith("--"):
                keys[text[2:]] = keys[text[2:].replace("-", "_")] = flag
    return keys


def parse_tokens(tokens: list[str], options: dict[str, Flag], where: str) -> dict:
    """Command-line tokens given to `batch` for its lines' commands (e.g. `--strength 0.5 --masked-only`) -> values,
    by the same declarations: what a line's command does not take is refused, naming the flag."""
    by_flag = {}
    for flag in options.values():
        for text in flag.flags:
            by_flag[text] = (flag, True)
        if flag.off:
            by_flag[flag.off] = (flag, False)
    values: dict = {}
    rest = list(tokens)
    while rest:
        token = rest.pop(0)
        text, eq, inline = token.partition("=") if token.startswith("--") else (token, "", "")
        if text not in by_flag:
            raise UsageError(f"{where}: No such option: {text}" if text.startswith("-") else f"{where}: Got unexpected "
                             f"extra argument ({token})")
        flag, on = by_flag[text]
        if flag.kind in (bool, "bools"):
            values[flag.name] = flag.convert(inline, where) if eq else on
            continue
        if not eq and not rest:
            raise UsageError(f"{where}: Option '{text}' requires an argument.")
        value = flag.convert(inline if eq else rest.pop(0), where)
        values[flag.name] = values.get(flag.name, []) + value if flag.kind == "texts" else value
    return values
