"""What a model says it was trained for (the `limits` of its diffcli.json), checked against a plan.

Each thing a job asks outside them becomes one warning line: printed on stderr at plan time (not with --quiet) and
kept in every image's metadata `warnings`. A model without the section (every model but the bundled tiny-shapes)
gets none. Keys, each optional:
- `trained_size`: [width, height] it was trained at; other sizes warn;
- `vocabulary`: a name in VOCABULARIES: the prompt's words it does not know are named;
- `outpaint`: what goes wrong when it outpaints (a phrase);
- `hires`: what goes wrong in a hires pass at any strength (a phrase), or else
- `hires_strength_max`: the --hires-strength above which its hires pass re-draws objects;
- `docs`: where its limits are described.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

# `vocabulary` names -> the module that knows them (known_words(model_dir), summary()): a fixed table, so a model
# folder's diffcli.json never names code to import
VOCABULARIES = {"shapes": "diffcli.shapes.vocabulary"}
MAX_LISTED = 8  # unknown words named on the line; the rest are counted
WORD = re.compile(r"[^\W_]+")  # runs of letters and digits, as the CLIP pre-tokenizer splits words off punctuation


def check(spec, job, width: int, height: int) -> list[str]:
    """The warning lines for `job` on `spec` at width x height (the first pass's size)."""
    limits = spec.defaults.get("limits")
    if not isinstance(limits, dict):
        return []
    name = Path(spec.name).name
    see = f"; see {limits['docs']}" if limits.get("docs") else ""
    lines = []
    unknown, knows = unknown_words(spec, job, limits.get("vocabulary"))
    if unknown:
        listed = ", ".join(unknown[:MAX_LISTED]) + (f" and {len(unknown) - MAX_LISTED} more" if len(unknown) > MAX_LISTED else "")
        lines.append(f"{name} ignores: {listed}; it knows {knows}{see}")
    trained = limits.get("trained_size")
    if trained and (width, height) != tuple(trained):
        smaller = width < trained[0] or height < trained[1]
        effect = "comes out as noise rather than shapes" if smaller else "repeats objects to fill the canvas"
        lines.append(f"{name} was trained at {trained[0]}x{trained[1]} only: at {width}x{height} it {effect}{see}")
    if limits.get("outpaint") and job.command == "outpaint":
        lines.append(f"{name} was not trained to outpaint: {limits['outpaint']}{see}")
    top, strength = limits.get("hires_strength_max"), job.second.hires_strength
    if job.second.hires and limits.get("hires"):  # no strength is safe
        lines.append(f"{name} with --hires: {limits['hires']}{see}")
    elif job.second.hires and top is not None and strength is not None and strength > top:
        default = spec.defaults.get("hires_strength")
        lines.append(f"--hires-strength {strength:g} re-draws {name}'s objects at the larger size (extra or missing "
                     f"shapes above {top:g})" + (f"; its default is {default:g}" if default is not None else "") + see)
    return lines


def unknown_words(spec, job, vocabulary: str | None) -> tuple[list[str], str]:
    """(the words of the prompt and negative prompt the model does not know, in order, and what it knows); nothing
    when the model names no vocabulary, or its module is not installed."""
    prompt = job.prompt
    if vocabulary not in VOCABULARIES or not (prompt.text.strip() or prompt.negative.strip()):
        return [], ""
    try:
        module = importlib.import_module(VOCABULARIES[vocabulary])
    except ImportError:
        return [], ""
    known = module.known_words(str(spec.config_dir or spec.location))
    words = [w for text in (prompt.text, prompt.negative) for w in prompt_words(text, prompt.weighting)]
    return [w for w in dict.fromkeys(words) if w not in known], module.summary()


def prompt_words(text: str, weighting: bool = True) -> list[str]:
    """The words a prompt gives the text encoder, lowercased: without <lora:...> tags, attention brackets, weights
    and BREAK."""
    from diffcli import prompts

    text = prompts.strip_extra_networks(text)
    if weighting:
        text = " ".join(fragment for fragment, weight in prompts.parse_weights(text) if weight != prompts.BREAK)
    return WORD.findall(text.lower())
