import re
from pathlib import Path

from cosmos_train.spec_docs import END, START, spec_reference_markdown

ROOT = Path(__file__).parents[2]


def test_readme_spec_reference_is_the_generated_one():
    readme = (ROOT / "README.md").read_text()
    block = readme[readme.index(START): readme.index(END) + len(END)]
    assert block == spec_reference_markdown(), "regenerate with `cosmos-train schema --markdown`"


def test_ci_runs_exactly_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    setup = readme[readme.index("## Set-up"):]
    commands = re.findall(r"^(python -m pytest[^\n]*)$", setup, flags=re.M)
    assert commands, "README set-up names no test command"
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert commands[0] in ci_lines
