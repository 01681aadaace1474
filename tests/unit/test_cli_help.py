"""CLI help: every flag has help, every sub-command's help lists its actions."""

from __future__ import annotations

import argparse

from wsync.cli import build_parser


def _walk(parser: argparse.ArgumentParser, path: str = "wsync"):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _walk(sub, f"{path} {name}")


def test_every_flag_and_argument_has_help():
    missing = []
    for path, parser in _walk(build_parser()):
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            if not action.help or action.help == argparse.SUPPRESS:
                missing.append(f"{path} {'/'.join(action.option_strings) or action.dest}")
    assert missing == []


def test_every_sub_command_help_lists_its_actions():
    for path, parser in _walk(build_parser()):
        for action in parser._actions:
            if not isinstance(action, argparse._SubParsersAction):
                continue
            text = parser.format_help()
            helped = {a.dest: a.help for a in action._choices_actions}
            flat = " ".join(text.split())
            for name in action.choices:
                assert helped.get(name), f"{path} {name} has no help line"
                assert f"{name} {' '.join(helped[name].split())}" in flat, f"{path} --help does not list {name}"
