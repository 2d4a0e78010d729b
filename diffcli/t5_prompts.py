"""A1111 attention weighting for the families whose pipelines pair CLIP with T5: SD3 (two CLIPs' hidden states beside
T5's, both CLIPs pooled) and FLUX.1 (T5's hidden states, CLIP pooled). Built here: the embeddings their encode_prompt
makes, with each token's hidden state moved by its weight.

As ComfyUI weights CLIP and T5 tokens, not by scaling (A1111's rule, sd_embed's for T5): these transformers
layer-normalise their text tokens, which undoes a scale (on a tiny SD3, "a (red:1.8) cat" moved the image by 1/255).
A token of weight w gets empty + w * (hidden - empty), `empty` being the empty prompt's hidden state at the same place;
the pooled vectors stay unweighted. CLIP reads the first 75 tokens, T5 max_sequence_length, as in diffusers. Only a
prompt with weights comes here: unweighted ones go to the pipeline as text, so they stay pixel-equal to plain diffusers.
"""

from __future__ import annotations

import inspect

from diffcli import prompts


def pipeline_inputs(pipe, texts: list[str], negatives: list[str] | None, clip_skip: int | None,
                    max_sequence_length: int | None) -> dict:
    """prompt_embeds and pooled_prompt_embeds (and their negative_ pair when `negatives` is given), one row per image;
    clip_skip as A1111 counts it (1 = the last layer), max_sequence_length None: the pipeline's default."""
    import torch

    if max_sequence_length is None:
        max_sequence_length = inspect.signature(pipe.__call__).parameters["max_sequence_length"].default
    # SD3's encode_prompt applies clip skip to the prompt, not to the negative: so here too
    wanted = [(text, clip_skip or 1) for text in texts] + [(text, 1) for text in negatives or []]
    empty: dict[int, list] = {}  # the empty prompt's states per clip skip, encoded once for every weighted text
    with torch.no_grad():
        rows = {key: _encode(pipe, *key, max_sequence_length, empty) for key in dict.fromkeys(wanted)}
    inputs = {"prompt_embeds": torch.cat([rows[key][0] for key in wanted[:len(texts)]]),
              "pooled_prompt_embeds": torch.cat([rows[key][1] for key in wanted[:len(texts)]])}
    if negatives is not None:
        inputs.update(negative_prompt_embeds=torch.cat([rows[key][0] for key in wanted[len(texts):]]),
                      negative_pooled_prompt_embeds=torch.cat([rows[key][1] for key in wanted[len(texts):]]))
    return inputs


def _encode(pipe, text: str, clip_skip: int, length: int, empty: dict):
    """One text's (embeds, pooled) as the pipeline's encode_prompt lays them out, weighted: a token of weight w gets
    empty + w * (hidden - empty), `empty` being the empty prompt's hidden state at its place (kept in `empty`)."""
    import torch

    parts, weights, pooled = _unweighted(pipe, text, clip_skip, length)
    if any(w != 1.0 for each in weights for w in each):
        if clip_skip not in empty:
            empty[clip_skip] = _unweighted(pipe, "", clip_skip, length)[0]
        parts = [e + torch.tensor(w, device=h.device, dtype=h.dtype).view(1, -1, 1) * (h - e)
                 for h, e, w in zip(parts, empty[clip_skip], weights)]
    if len(parts) == 3:  # SD3: CLIP-L and CLIP-G side by side, padded to T5's width, then T5
        clip = torch.cat(parts[:2], dim=-1)
        clip = torch.nn.functional.pad(clip, (0, parts[2].shape[-1] - clip.shape[-1]))
        return torch.cat([clip, parts[2]], dim=-2), pooled
    return parts[0], pooled  # FLUX.1: T5 alone


def _unweighted(pipe, text: str, clip_skip: int, length: int):
    """The hidden states the text's tokens get (SD3: CLIP-L, CLIP-G, T5; FLUX.1: T5), each token's weight per part,
    and the pooled CLIP vector (SD3: both side by side)."""
    import torch

    if hasattr(pipe, "text_encoder_3"):  # SD3
        encoded = [_clip(pipe, tokenizer, encoder, text, clip_skip) for tokenizer, encoder in
                   ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2))]
        hidden, weights = _t5(pipe, pipe.tokenizer_3, pipe.text_encoder_3, text, length, encoded[0][0])
        return ([encoded[0][0], encoded[1][0], hidden], [encoded[0][1], encoded[1][1], weights],
                torch.cat([encoded[0][2], encoded[1][2]], dim=-1))
    _, _, pooled = _clip(pipe, pipe.tokenizer, pipe.text_encoder, text, None)  # FLUX.1: CLIP's pooled output only
    hidden, weights = _t5(pipe, pipe.tokenizer_2, pipe.text_encoder_2, text, length, pooled)
    return [hidden], [weights], pooled


def _tokens(pipe, tokenizer, text: str) -> tuple[list[int], list[float]]:
    """The text's token ids (no special tokens) and each one's weight, as prompts.tokenize reads them (textual
    inversion, extra networks, weights), its chunks joined again: BREAK has no meaning in one sequence."""
    chunks = prompts.tokenize(pipe, tokenizer, text, weighting=True)
    return [t for ids, _ in chunks for t in ids], [w for _, weights in chunks for w in weights]


def _clip(pipe, tokenizer, encoder, text: str, clip_skip: int | None):
    """A CLIP encoder's (hidden states, weights, pooled) for 77 tokens: SD3's take the layer before the last (clip_skip
    further back) and the projected pooled output; clip_skip None: FLUX.1's pooled output only (hidden None)."""
    import torch

    tokens, weights = _tokens(pipe, tokenizer, text)
    ids, weights = prompts.padded(tokenizer, (tokens[:prompts.CHUNK], weights[:prompts.CHUNK]))
    out = encoder(torch.tensor([ids], device=pipe._execution_device), output_hidden_states=True)
    if clip_skip is None:
        return None, weights, out.pooler_output.to(encoder.dtype)
    return out.hidden_states[-(clip_skip + 1)].to(encoder.dtype), weights, out[0].to(encoder.dtype)


def _t5(pipe, tokenizer, encoder, text: str, length: int, like):
    """T5's (hidden states, weights) for `length` tokens (the text, </s>, padding); without a T5 (SD3 loaded without
    it) zeros, as diffusers gives."""
    import torch

    if encoder is None:
        shape = (1, pipe.tokenizer_max_length, pipe.transformer.config.joint_attention_dim)
        return torch.zeros(shape, device=like.device, dtype=like.dtype), [1.0] * shape[1]
    tokens, weights = _tokens(pipe, tokenizer, text)
    tokens, weights = tokens[:length - 1] + [tokenizer.eos_token_id], weights[:length - 1] + [1.0]
    fill = length - len(tokens)
    ids = torch.tensor([tokens + [tokenizer.pad_token_id] * fill], device=pipe._execution_device)
    return encoder(ids)[0].to(encoder.dtype), weights + [1.0] * fill
