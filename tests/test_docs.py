"""The docs tell the truth: the README's two commands verbatim, and docs/flags.md's tables in sync with argparse."""
import os

import evaluate
import export
import flags
from conftest import REPO

README = open(os.path.join(REPO, "README.md")).read()
FLAGS = open(os.path.join(REPO, "docs", "flags.md")).read()


def test_the_two_commands_are_in_the_readme():
    assert "pip install -r requirements.txt && python train.py\n" in README
    assert "pip install -r requirements.txt && python -m pytest\n" in README
    assert "python -m pytest" in open(os.path.join(REPO, ".ci", "run")).read()


def test_flag_tables_match_argparse():
    for script, module in (("train", flags), ("evaluate", evaluate), ("export", export)):
        table = flags_markdown(module.get_args_parser())
        assert f"## {script}.py\n" in FLAGS and table in FLAGS, (
            f"docs/flags.md's {script}.py table is out of date; regenerate it with: python -c 'import sys; "
            f"sys.path[:0] = [\"tests\", \".\"]; import {module.__name__}, test_docs; "
            f"print(test_docs.flags_markdown({module.__name__}.get_args_parser()))'")


def test_the_readme_stays_short_and_links_only_files_that_exist():
    import re
    assert len(README.split()) <= 3000, len(README.split())
    for link in re.findall(r"\]\(((?:docs|recipes|tests|tools)/[^)#]+)", README):
        assert os.path.exists(os.path.join(REPO, link)), link


def flags_markdown(parser):
    """A flag table for an argparse parser, as docs/flags.md holds it."""
    rows = ["| flag | default | meaning |", "| --- | --- | --- |"]
    for action in parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        names = ", ".join(f"`{flag}`" for flag in action.option_strings)
        if action.choices:
            names += " {" + ",".join(str(c) for c in action.choices) + "}"
        default = "" if action.default is None or action.default is False else f"`{action.default}`"
        rows.append(f"| {names} | {default} | {(action.help or '').replace('|', '/')} |")
    return "\n".join(rows)
