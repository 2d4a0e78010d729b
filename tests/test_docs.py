"""docs/usage.md, the reference, is checked against the commands' --help so the two cannot drift apart:

- every long option of every command (as Click builds it from the Typer app) is named in that command's section of
  docs/usage.md (SECTIONS below says which headings document which command);
- every `--flag` that docs/usage.md or README.md mentions exists on some diffcli command, unless it belongs to
  another tool named in FOREIGN (or is a flag of the lab's trainer, read from lab/train.py).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import typer

from diffcli.cli import app

ROOT = Path(__file__).resolve().parent.parent
USAGE = ROOT / "docs" / "usage.md"
FLAG = re.compile(r"(?<![\w-])--[A-Za-z][\w-]*")  # `--cfg`, `--no-optimize`, `--multi_gpu`; not `-N`, not `a -- b`
GROUP = typer.main.get_command(app)
COMMANDS = {"diffcli": GROUP, **GROUP.commands}  # "diffcli": the group's own options (--debug, --version)

# Where docs/usage.md documents each command. "## Title" is that heading's whole section (down to the next heading of
# its level or above); "## Title:intro" only its text before its first subheading (the options the four image commands
# share are listed there, each command's own in its ### subsection).
IMAGE_COMMANDS = "## img2img, inpaint, outpaint, upscale"
SECTIONS = {
    "diffcli": ["## Other commands and global flags"],
    "txt2img": ["## txt2img"],
    "img2img": [f"{IMAGE_COMMANDS}:intro", "### img2img"],
    "inpaint": [f"{IMAGE_COMMANDS}:intro", "### inpaint"],
    "outpaint": [f"{IMAGE_COMMANDS}:intro", "### outpaint"],
    "upscale": [f"{IMAGE_COMMANDS}:intro", "### upscale"],
    "edit": [f"{IMAGE_COMMANDS}:intro", "### edit"],
    "replay": ["### Reproducibility and metadata"],
    "batch": ["## Batch and scripts"],
    "bench": ["## Speed and memory"],
    "eval": ["## The bundled model"],
    "schedulers": ["## Other commands and global flags"],
    "info": ["## Other commands and global flags"],
    "serve": ["## Server and client"],
    "preprocess": ["## Control maps"],
}
# `--flags` the documents mention that are not diffcli's, each with its tool.
FOREIGN = {
    "--index-url",  # pip (README: installing PyTorch's CPU build)
    # accelerate launch (usage.md, "Several processes and GPUs")
    "--multi_gpu", "--num_processes", "--cpu", "--num_machines", "--machine_rank", "--main_process_ip",
    "--main_process_port",
}


def headings(text: str) -> list[tuple[int, int, str]]:
    """(line number, level, "## Title") of every Markdown heading outside fenced code blocks."""
    found, fenced = [], False
    for number, line in enumerate(text.splitlines()):
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and (match := re.match(r"(#{1,6}) \S", line)):
            found.append((number, len(match.group(1)), line.strip()))
    return found


def section(text: str, where: str) -> str:
    """The text under the heading `where` ("## Title" or "## Title:intro"), heading line included."""
    title, _, part = where.partition(":intro") if where.endswith(":intro") else (where, "", "")
    marks = headings(text)
    starts = [(number, level) for number, level, heading in marks if heading == title]
    assert len(starts) == 1, f"docs/usage.md should have exactly one heading {title!r}"
    start, level = starts[0]
    ends = [number for number, other, _ in marks if number > start and (part or other <= level)]
    lines = text.splitlines()
    return "\n".join(lines[start:ends[0] if ends else len(lines)])


def long_options(command) -> set[str]:
    return {name for param in command.params for name in [*param.opts, *param.secondary_opts]
            if name.startswith("--") and name != "--help"}


def mentioned(text: str) -> set[str]:
    return set(FLAG.findall(text))


def test_every_command_has_a_section():
    assert set(SECTIONS) == set(COMMANDS), "add the new command's section to SECTIONS (and document it in docs/usage.md)"


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_option_is_documented_in_its_commands_section(name):
    text = USAGE.read_text()
    documented = set().union(*(mentioned(section(text, where)) for where in SECTIONS[name]))
    missing = sorted(long_options(COMMANDS[name]) - documented)
    assert not missing, f"`diffcli {name} --help` options not in docs/usage.md {SECTIONS[name]}: {', '.join(missing)}"


@pytest.mark.parametrize("document", ["docs/usage.md", "README.md"])
def test_every_flag_the_docs_mention_exists(document):
    lab = set(re.findall(r"add_argument\(\"(--[\w-]+)\"", (ROOT / "lab" / "train.py").read_text()))  # `python -m lab.train`
    known = set().union(*(long_options(command) for command in COMMANDS.values())) | {"--help"} | FOREIGN | lab
    unknown = sorted(mentioned((ROOT / document).read_text()) - known)
    assert not unknown, f"{document} mentions flags no diffcli command has: {', '.join(unknown)}"


def test_the_checks_see_flags_as_written():
    """The token rule itself: switch pairs and slashes count, a longer flag does not stand for a shorter one."""
    assert mentioned("`--optimize/--no-optimize`, `--width/--height`, `--lora-dir DIR`") == {
        "--optimize", "--no-optimize", "--width", "--height", "--lora-dir"}
    assert "--lora" not in mentioned("`--lora-dir`") and mentioned("a -- b, -N 4") == set()
