"""The README's Quickstart stays true: two commands, the second one is what CI runs."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def quickstart_commands() -> list[str]:
    section = (ROOT / "README.md").read_text().split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", section, re.S)]


def test_quickstart_has_exactly_two_commands():
    install_and_generate, install_and_test = quickstart_commands()
    assert "diffcli txt2img" in install_and_generate and "pytest" in install_and_test


def test_ci_runs_the_readme_test_command_verbatim():
    ci_script = (ROOT / ".ci" / "run").read_text()
    assert quickstart_commands()[1] in ci_script.splitlines()
