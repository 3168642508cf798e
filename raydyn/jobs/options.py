"""Options of an analysis: a frozen dataclass whose fields are the job's settings and the CLI's flags.

A field's value is what the job reads (``self.options.delays``); its :func:`option` metadata says how
the command line spells and parses it (``raydyn analyze <name>`` is generated from the fields by
:mod:`raydyn.cli`), and :meth:`Options.record` is what lands in every table's ``options_json`` column.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

from raydyn.errors import RaydynError

_META = "raydyn"


@dataclass(frozen=True)
class OptionSpec:
    """How one options field appears on the command line."""

    help: str = ""
    flag: Optional[str] = None          # default: --field-name (bools: --field-name/--no-field-name)
    parse: Optional[Callable[[str], Any]] = None  # the command line gives a string; this turns it into the value
    cli_default: Optional[str] = None   # what --help shows, and the parser gets when the flag is absent
    choices: tuple[str, ...] = ()       # allowed values of a string option
    cli: bool = True                    # False: settable from Python only (e.g. a sample size tests shrink)
    record: bool = True                 # False: not written to options_json (e.g. where to save plots)


def option(default: Any = None, help: str = "", *, flag: str | None = None, parse: Callable[[str], Any] | None = None,
           cli_default: str | None = None, choices: Iterable[str] = (), cli: bool = True,
           record: bool = True) -> Any:
    """A field of an :class:`Options` dataclass with its command-line spelling and help.

    ``parse`` turns the command line's string into the field's value (``--rank 0.99`` -> 0.99); it gets
    ``cli_default`` (default: None) when the flag is not given. Lists and tuples without ``parse`` are
    given comma-separated (``--group-by lr,width``)."""
    spec = OptionSpec(help, flag, parse, cli_default, tuple(choices), cli, record)
    return field(default=default, metadata={_META: spec})


def comma_list(text: str | None) -> list[str] | None:
    """``"a,b"`` -> ``["a", "b"]``; None or empty -> None."""
    return [v for v in text.split(",") if v] or None if text else None


@dataclass(frozen=True)
class Options:
    """Base of every analysis' options. Subclasses are frozen dataclasses whose fields use :func:`option`;
    :meth:`check` (called on construction) raises :class:`RaydynError` naming the flag of a bad value."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            spec = option_spec(f)
            value = getattr(self, f.name)
            if spec.choices and value is not None and value not in spec.choices:
                raise RaydynError(f"{self.flag(f.name)} {value!r}: allowed values are {', '.join(spec.choices)}")
        self.check()

    def check(self) -> None:
        """Cross-field and range checks (override)."""

    @classmethod
    def flag(cls, name: str) -> str:
        """The command-line flag of field ``name`` (for messages)."""
        f = {f.name: f for f in dataclasses.fields(cls)}[name]
        return cli_flag(f).split("/")[0]

    def record(self) -> dict[str, Any]:
        """The options as written to the ``options_json`` column of every table the job writes."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self) if option_spec(f).record}

    # a read-only mapping of the recorded options (``dict(job.options)``, ``seen.update(job.options)``)
    def keys(self):
        return self.record().keys()

    def __getitem__(self, name: str) -> Any:
        return self.record()[name]


def _plain(v: Any) -> Any:
    if isinstance(v, (tuple, list)):
        return [_plain(x) for x in v]
    return v


def option_spec(f: dataclasses.Field) -> OptionSpec:
    return f.metadata.get(_META) or OptionSpec()


def cli_flag(f: dataclasses.Field) -> str:
    spec = option_spec(f)
    if spec.flag:
        return spec.flag
    name = "--" + f.name.replace("_", "-")
    return f"{name}/--no-{name[2:]}" if f.type in (bool, "bool") else name


def is_sequence(tp: Any) -> bool:
    """A list/tuple type, possibly inside Optional (given comma-separated on the command line)."""
    import types

    union = typing.get_origin(tp) in (typing.Union, types.UnionType)
    args = [a for a in typing.get_args(tp) if a is not type(None)] if union else [tp]
    return any(typing.get_origin(a) in (list, tuple) or a in (list, tuple) for a in args)


def option_types(cls: type) -> dict[str, Any]:
    """Resolved field annotations of an options dataclass (``from __future__ import annotations`` safe)."""
    import sys

    return typing.get_type_hints(cls, vars(sys.modules[cls.__module__]))


__all__ = ["Options", "OptionSpec", "option", "comma_list", "cli_flag", "option_spec", "option_types", "is_sequence"]
