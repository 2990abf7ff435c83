"""README.md tells the truth: the two commands verbatim, and a flag table for each script in sync with argparse."""
import os

import evaluate
import train
import utils
from conftest import REPO

README = open(os.path.join(REPO, "README.md")).read()


def test_the_two_commands_are_in_the_readme():
    assert "pip install -r requirements.txt && python train.py\n" in README
    assert "pip install -r requirements.txt && python -m pytest\n" in README
    assert "python -m pytest" in open(os.path.join(REPO, ".ci", "run")).read()


def test_flag_tables_match_argparse():
    for script in (train, evaluate):
        table = utils.flags_markdown(script.get_args_parser())
        assert table in README, (f"README's {script.__name__}.py flag table is out of date; regenerate it with: "
                                 f"python -c 'import utils, {script.__name__}; "
                                 f"print(utils.flags_markdown({script.__name__}.get_args_parser()))'")
