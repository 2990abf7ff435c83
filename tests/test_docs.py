"""README.md tells the truth: the two commands verbatim, and a flag table for each script in sync with argparse."""
import os

import evaluate
import flags
from conftest import REPO

README = open(os.path.join(REPO, "README.md")).read()


def test_the_two_commands_are_in_the_readme():
    assert "pip install -r requirements.txt && python train.py\n" in README
    assert "pip install -r requirements.txt && python -m pytest\n" in README
    assert "python -m pytest" in open(os.path.join(REPO, ".ci", "run")).read()


def test_flag_tables_match_argparse():
    for script, module in (("train", flags), ("evaluate", evaluate)):
        table = flags_markdown(module.get_args_parser())
        assert table in README, (f"README's {script}.py flag table is out of date; regenerate it with: "
                                 f"python -c 'import {module.__name__}, tests.test_docs as t; "
                                 f"print(t.flags_markdown({module.__name__}.get_args_parser()))'")


def flags_markdown(parser):
    """The README's flag table for an argparse parser (tests/test_docs.py keeps the README in sync with it)."""
    rows = ["| flag | default | meaning |", "| --- | --- | --- |"]
    for action in parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        flags = ", ".join(f"`{flag}`" for flag in action.option_strings)
        if action.choices:
            flags += " {" + ",".join(str(c) for c in action.choices) + "}"
        default = "" if action.default is None or action.default is False else f"`{action.default}`"
        rows.append(f"| {flags} | {default} | {(action.help or '').replace('|', '/')} |")
    return "\n".join(rows)

