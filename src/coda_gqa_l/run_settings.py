"""``RunSettings``: what the settings dataclasses of coda-train, coda-eval and coda-scratch share.

Each is a dataclass whose fields are its command line's option names (``_`` for ``-``), so the
command line fills it and a script can build it by name. This mixin gives them named presets, the
check that parser and fields have not drifted apart, and the record a checkpoint or report keeps.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, ClassVar, TypeVar

Settings = TypeVar("Settings", bound="RunSettings")


class RunSettings:
    """Mixin for a dataclass of a command's settings; the subclass fills ``PRESETS`` after its body."""

    PRESETS: ClassVar[dict[str, Any]] = {}
    # options of the command line that are not settings of a run (e.g. a flag that hands over to another command)
    NOT_SETTINGS: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def preset(cls: type[Settings], name: str, **overrides: Any) -> Settings:
        """A named starting point with ``overrides`` on top; unknown names raise, naming the known ones."""
        if name not in cls.PRESETS:
            raise ValueError(f"unknown {cls.__name__} preset {name!r}; choose from {sorted(cls.PRESETS)}")
        return dataclasses.replace(cls.PRESETS[name], **overrides)

    @classmethod
    def from_namespace(cls: type[Settings], args: argparse.Namespace) -> Settings:
        """The command line's parsed options; an option that is not a field (or the reverse) raises,
        so the parser and the dataclass cannot drift apart."""
        given = {k: v for k, v in vars(args).items() if k not in cls.NOT_SETTINGS}
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        if set(given) != names:
            raise ValueError(f"options and {cls.__name__} fields differ: {sorted(set(given) ^ names)}")
        return cls(**given)

    @classmethod
    def from_command_line(
        cls: type[Settings], parser: argparse.ArgumentParser, argv: list[str] | None, check: bool = True
    ) -> Settings:
        """``argv`` parsed by ``parser`` into settings; with ``check``, a setting that cannot run ends
        the command with its reason (``parser.error``, exit status 2)."""
        settings = cls.from_namespace(parser.parse_args(argv))
        if check:
            try:
                settings.check()
            except ValueError as exc:
                parser.error(str(exc))
        return settings

    def check(self) -> None:
        """Raise ValueError naming the first setting that cannot run (the subclass says which)."""

    def as_record(self) -> dict[str, str]:
        """Every setting as text, as a checkpoint's or report's metadata keeps them."""
        return {f.name: str(getattr(self, f.name)) for f in dataclasses.fields(self)}  # type: ignore[arg-type]
