"""A1111 prompt syntax and prompt encoding: attention weights and prompts longer than 77 tokens.

Semantics follow AUTOMATIC1111's stable-diffusion-webui (prompt_parser.parse_prompt_attention and
sd_hijack_clip): `(x)` multiplies the weight of x by 1.1, `[x]` divides it by 1.1, `(x:1.3)` multiplies
it by 1.3, brackets nest, `\\(` is a literal bracket; a stray `)` or `]` stays in the text and an
unclosed `(` or `[` weights the rest of the prompt. `BREAK` starts a new chunk. Tokens are cut into
chunks of 75 (+BOS/EOS = 77), each encoded by CLIP on its own and concatenated; weighted hidden states
are rescaled so each chunk keeps its original mean. A plain prompt of up to 75 tokens encodes exactly
as diffusers' own `encode_prompt` does.
"""

from __future__ import annotations

import re

EMPHASIS = 1.1  # A1111: ( ) multiplies by 1.1, [ ] divides by 1.1
CHUNK = 75  # tokens per chunk, before BOS and EOS
COMMA_BACKTRACK = 20  # a chunk that fills up within 20 tokens after a comma moves the words after it to the next chunk
BREAK = -1.0  # weight marking a BREAK between fragments
COMMA = ",</w>"  # CLIP's BPE spelling of a comma that ends a word

_TOKEN = re.compile(
    r"""\\[\\()\[\]]            # escaped bracket or backslash
      | \( | \[                 # openings
      | :\s*([+-]?(?:\d+\.?\d*|\.\d+))\s*\)   # explicit weight closing a round bracket
      | \) | \]                 # closings
      | [^\\()\[\]:]+           # plain text
      | [\\:]                   # a lone backslash or colon is text
    """,
    re.X,
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*")
_EXTRA_NETWORK = re.compile(r"<(lora|lyco|hypernet):([^:>]+)(?::([^:>]*))?(?::[^>]*)?>", re.I)


def parse_weights(text: str) -> list[tuple[str, float]]:
    """Split an A1111-syntax prompt into (text, weight) fragments, merging neighbours of equal weight."""
    parts: list[list] = []
    rounds: list[int] = []
    squares: list[int] = []

    def scale(start: int, factor: float) -> None:
        for part in parts[start:]:
            if part[1] != BREAK:
                part[1] *= factor

    for match in _TOKEN.finditer(text):
        piece, weight = match.group(0), match.group(1)
        if len(piece) == 2 and piece[0] == "\\":
            parts.append([piece[1], 1.0])
        elif piece == "(":
            rounds.append(len(parts))
        elif piece == "[":
            squares.append(len(parts))
        elif weight is not None and rounds:
            scale(rounds.pop(), float(weight))
        elif piece == ")" and rounds:
            scale(rounds.pop(), EMPHASIS)
        elif piece == "]" and squares:
            scale(squares.pop(), 1 / EMPHASIS)
        elif weight is not None:  # `:1.2)` with no open bracket: literal text
            parts.append([piece, 1.0])
        else:
            for i, chunk in enumerate(_BREAK.split(piece)):
                if i:
                    parts.append(["BREAK", BREAK])
                parts.append([chunk, 1.0])
    for start in rounds:  # unclosed openings weight the rest, as in A1111
        scale(start, EMPHASIS)
    for start in squares:
        scale(start, 1 / EMPHASIS)
    merged: list[list] = []
    for text_part, weight in parts:
        if not text_part and weight != BREAK:
            continue
        if merged and merged[-1][1] == weight and weight != BREAK:
            merged[-1][0] += text_part
        else:
            merged.append([text_part, weight])
    return [(t, w) for t, w in merged] or [("", 1.0)]


def check_weights(flag: str, text: str) -> None:
    """Refuse attention weights that are not finite numbers, e.g. `(x:1e400)` or nested ones that overflow."""
    import math

    from diffcli.errors import UsageError

    for fragment, weight in parse_weights(text):
        if not math.isfinite(weight):
            raise UsageError(f"{flag}: the attention weight of {fragment.strip()[:40]!r} is not a finite number, got {weight}",
                             "weights like (word:1.3) are small numbers, typically 0 to 2")


def strip_extra_networks(text: str) -> str:
    """The prompt without A1111 `<lora:name:weight>` tags (they select adapters, see adapters.py)."""
    return _EXTRA_NETWORK.sub("", text)


def extra_networks(text: str) -> list[tuple[str, str, str | None]]:
    """(kind, name, weight text) for every `<lora:name:weight>` tag in the prompt."""
    return [(m.group(1).lower(), m.group(2).strip(), m.group(3)) for m in _EXTRA_NETWORK.finditer(text)]


def chunk_tokens(fragments: list[tuple[list[int], float]], comma: int | None) -> list[tuple[list[int], list[float]]]:
    """Cut weighted token ids into chunks of at most 75, preferring to break after a nearby comma (A1111)."""
    chunks: list[tuple[list[int], list[float]]] = []
    tokens: list[int] = []
    weights: list[float] = []
    last_comma = -1

    def flush() -> None:
        nonlocal tokens, weights, last_comma
        chunks.append((tokens, weights))
        tokens, weights, last_comma = [], [], -1

    for ids, weight in fragments:
        if weight == BREAK:
            flush()
            continue
        for token in ids:
            if token == comma:
                last_comma = len(tokens)
            elif len(tokens) == CHUNK and last_comma != -1 and len(tokens) - last_comma <= COMMA_BACKTRACK:
                cut = last_comma + 1
                moved = tokens[cut:], weights[cut:]
                tokens, weights = tokens[:cut], weights[:cut]
                flush()
                tokens, weights = list(moved[0]), list(moved[1])
            if len(tokens) == CHUNK:
                flush()
            tokens.append(token)
            weights.append(weight)
    if tokens or not chunks:
        flush()
    return chunks


def is_weighted(text: str) -> bool:
    """Whether A1111 attention syntax changes the weight of some of the text (or BREAKs it)."""
    return any(weight != 1.0 for _, weight in parse_weights(strip_extra_networks(text)))


def has_break(text: str) -> bool:
    """Whether the text has an A1111 BREAK (read with --weighting)."""
    return any(weight == BREAK for _, weight in parse_weights(strip_extra_networks(text)))


def tokenize(pipe, tokenizer, text: str, weighting: bool) -> list[tuple[list[int], list[float]]]:
    """Prompt text -> chunks of (token ids, weights), without BOS/EOS or padding."""
    text = strip_extra_networks(text)
    fragments = parse_weights(text) if weighting else [(text, 1.0)]
    convert = getattr(pipe, "maybe_convert_prompt", None)  # expands multi-vector textual-inversion tokens
    texts = [convert(t, tokenizer) if convert and w != BREAK else t for t, w in fragments]
    ids = tokenizer(texts, add_special_tokens=False, truncation=False)["input_ids"]
    return chunk_tokens([(i, w) for i, (_, w) in zip(ids, fragments)], comma_id(tokenizer))


def comma_id(tokenizer) -> int | None:
    """The comma token's id (A1111 breaks long prompts after the last comma), or None where the vocabulary has none.
    Looked up alone: get_vocab() builds the whole 49,408-entry dict, 20 ms a call."""
    found = tokenizer.convert_tokens_to_ids(COMMA)
    return None if found is None or (found == tokenizer.unk_token_id and tokenizer.unk_token != COMMA) else found


def padded(tokenizer, chunk: tuple[list[int], list[float]]) -> tuple[list[int], list[float]]:
    """BOS + tokens + EOS + padding to 77, as diffusers' tokenizer call lays a single chunk out."""
    tokens, weights = chunk
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    fill = CHUNK - len(tokens)
    return ([tokenizer.bos_token_id, *tokens, tokenizer.eos_token_id] + [pad] * fill, [1.0, *weights, 1.0] + [1.0] * fill)


def _hidden(encoder, ids, clip_skip: int, xl: bool):
    """Hidden states as diffusers' pipelines take them; clip_skip counts as in A1111 (1 = last layer). The encoder's
    OpenVINO twin (openvino_unet.OpenVINOTextEncoder, --backend openvino) computes them where it knows every token."""
    twin = getattr(encoder, "diffcli_openvino", None)
    out = twin(ids) if twin is not None else None
    out = encoder(ids, output_hidden_states=True) if out is None else out
    if xl:  # SDXL uses the penultimate layer without the final norm; clip skip goes further back
        return out.hidden_states[-(clip_skip + 1)], out[0]
    if clip_skip <= 1:
        return out[0], None
    norm = getattr(encoder, "text_model", encoder).final_layer_norm  # transformers 5 dropped the text_model wrapper
    return norm(out.hidden_states[-clip_skip]), None


def text_encoders(pipe) -> list[tuple]:
    """The pipeline's (tokenizer, text encoder) pairs that exist: one for SD, two for SDXL, the second alone for a refiner."""
    pairs = [(getattr(pipe, f"tokenizer{n}", None), getattr(pipe, f"text_encoder{n}", None)) for n in ("", "_2")]
    return [(tokenizer, encoder) for tokenizer, encoder in pairs if encoder is not None]


def encode(pipe, prompts: list[str], weighting: bool = True, clip_skip: int = 1):
    """Encode prompts with A1111 weighting and chunking; returns (embeds, pooled or None), one row each.

    All prompts are padded with empty chunks to the longest one's chunk count.
    """
    import torch

    pairs = text_encoders(pipe)
    xl = hasattr(pipe, "text_encoder_2")
    device = pipe._execution_device
    per_prompt = [tokenize(pipe, pairs[0][0], p, weighting) for p in prompts]
    count = max(len(c) for c in per_prompt)
    embeds, pooled = [], []
    with torch.no_grad():
        for chunks in per_prompt:
            chunks = chunks + [([], [])] * (count - len(chunks))
            hidden, first_pooled = [], None
            weights = None
            for tokenizer, encoder in pairs:
                laid_out = [padded(tokenizer, c) for c in chunks]
                ids = torch.tensor([ids for ids, _ in laid_out], device=device)
                weights = torch.tensor([w for _, w in laid_out], device=device)
                states, pool = _hidden(encoder, ids, clip_skip, xl)
                hidden.append(states)
                if pool is not None and pool.ndim == 2:  # the projected text embeds of XL's second encoder
                    first_pooled = pool[:1]
            z = torch.cat(hidden, dim=-1)  # (chunks, 77, dim) with the XL encoders side by side
            if weighting and bool((weights != 1).any()):
                z = apply_weights(z, weights.to(z.dtype))
            embeds.append(z.reshape(1, -1, z.shape[-1]))
            pooled.append(first_pooled)
    return torch.cat(embeds), (torch.cat(pooled) if xl else None)


def apply_weights(z, weights):
    """Scale each token's hidden state by its weight, then restore each chunk's mean (A1111).

    A chunk whose mean is ~0 (relative to its magnitude) before or after keeps its scale: the ratio would be noise.
    """
    import torch

    means = z.mean(dim=(1, 2), keepdim=True)
    z = z * weights.unsqueeze(-1)
    new = z.mean(dim=(1, 2), keepdim=True)
    scale = 1e-3 * z.abs().mean(dim=(1, 2), keepdim=True)
    meaningful = (new.abs() > scale) & (means.abs() > scale)
    return z * torch.where(meaningful, means / torch.where(meaningful, new, torch.ones_like(new)), torch.ones_like(new))


def chunk_count(pipe, prompt) -> int:
    """How many 75-token chunks a jobs.Prompt's text and negative encode to (the longer of the two)."""
    tokenizer = text_encoders(pipe)[0][0]  # the one encode() chunks with
    return max(len(tokenize(pipe, tokenizer, text, prompt.weighting)) for text in (prompt.text, prompt.negative))


def pipeline_inputs(pipe, prompts: list) -> dict:
    """The prompt arguments of a pipeline call, one row per image from that image's jobs.Prompt (weighting and clip
    skip from the first): embeddings when the pipeline takes them, else the strings."""
    import inspect

    import torch

    negatives = [each.negative for each in prompts]
    if "prompt_embeds" not in inspect.signature(pipe.__call__).parameters or not text_encoders(pipe):
        return {"prompt": [each.text for each in prompts], "negative_prompt": negatives if any(negatives) else None}
    texts = list(dict.fromkeys(text for each in prompts for text in (each.text, each.negative)))  # each encoded once
    embeds, pooled = encode(pipe, texts, prompts[0].weighting, prompts[0].clip_skip or 1)
    rows = {text: i for i, text in enumerate(texts)}
    positive, negative = [rows[each.text] for each in prompts], [rows[each.negative] for each in prompts]
    inputs = {"prompt_embeds": embeds[positive], "negative_prompt_embeds": embeds[negative]}
    if pooled is not None:
        inputs.update(pooled_prompt_embeds=pooled[positive], negative_pooled_prompt_embeds=pooled[negative])
        if getattr(pipe.config, "force_zeros_for_empty_prompt", False):  # an empty negative is zeros, as diffusers does
            empty = torch.tensor([not text for text in negatives], device=embeds.device)
            for key in ("negative_prompt_embeds", "negative_pooled_prompt_embeds"):
                shape = (-1,) + (1,) * (inputs[key].ndim - 1)
                inputs[key] = torch.where(empty.view(shape), torch.zeros_like(inputs[key]), inputs[key])
    return inputs
