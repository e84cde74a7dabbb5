"""Every console script's ``--help`` gives each option a sentence and its default, and a description
that does not stop mid-sentence."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator

import pytest

from coda_gqa_l.cli_help import HelpFormatter, describe_default, first_paragraph


def _builders() -> dict[str, Callable[[], argparse.ArgumentParser]]:
    from coda_gqa_l import demo
    from coda_gqa_l.evaluation import cli as evaluation_cli
    from coda_gqa_l.neuraldb import cli as neuraldb_cli
    from coda_gqa_l.neuraldb import demo as neuraldb_demo
    from coda_gqa_l.training import cli as training_cli
    from coda_gqa_l.training import scratch

    return {
        "coda-demo": demo.build_parser,
        "coda-db": neuraldb_cli.build_parser,
        "coda-db demo (its own process)": neuraldb_demo.build_parser,
        "coda-train": training_cli.build_parser,
        "coda-eval": evaluation_cli.build_parser,
        "coda-scratch": scratch.build_parser,
    }


def _parsers(name: str, parser: argparse.ArgumentParser) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for command, sub in action.choices.items():
                yield from _parsers(f"{name} {command}", sub)


def help_problems(name: str, parser: argparse.ArgumentParser) -> list[str]:
    """What a reader of ``--help`` would miss: options without a sentence or without their default,
    descriptions cut mid-sentence."""
    problems = []
    for where, each in _parsers(name, parser):
        description = (each.description or "").rstrip()
        if not description.endswith((".", ")")):
            problems.append(f"{where}: the description does not end a sentence: {description[-60:]!r}")
        formatter = each._get_formatter()
        for action in each._actions:
            if (
                not action.option_strings
                or action.help == argparse.SUPPRESS
                or isinstance(action, argparse._HelpAction)
            ):
                continue
            flag = action.option_strings[-1]
            text = formatter._get_help_string(action) or ""
            if len(action.help or "") < 8:
                problems.append(f"{where} {flag}: no sentence of help")
            if "default" not in text.lower():
                problems.append(f"{where} {flag}: the default is not said")
    return problems


@pytest.mark.parametrize("script", sorted(_builders()))
def test_every_option_has_a_sentence_and_its_default(script: str) -> None:
    parser = _builders()[script]()
    assert not help_problems(script, parser), "\n".join(help_problems(script, parser))
    parser.format_help()  # the % in a default or a help text would fail here


def test_the_check_can_fail_and_the_formatter_adds_defaults() -> None:
    bare = argparse.ArgumentParser(prog="x", description="Stops mid", formatter_class=HelpFormatter)
    bare.add_argument("--rate", type=float, default=0.5, help="rate")
    bare.add_argument("--fast", action="store_true", help="go fast on every row")
    assert help_problems("x", bare) == [
        "x: the description does not end a sentence: 'Stops mid'",
        "x --rate: no sentence of help",
    ]
    text = bare.format_help()
    assert "(default: 0.5)" in text and "go fast on every row (default: off)" in " ".join(text.split())
    plain = argparse.ArgumentParser(prog="y", description="Ends.")
    plain.add_argument("--rate", type=float, default=0.5, help="how fast it goes")
    assert help_problems("y", plain) == ["y --rate: the default is not said"]
    assert describe_default([4096, 16384]) == "4096 16384" and describe_default("10%") == "10%%"
    assert describe_default(None) == "none" and describe_default([]) == "none"
    assert first_paragraph("One line\ncontinued.\n\nMore.") == "One line continued."
