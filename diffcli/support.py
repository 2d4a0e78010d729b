"""What a model's family supports, checked against a job before any weights load: one exit-2 line for a setting the
family cannot honour, one warning line for a setting it reads otherwise (families.py declares what each supports)."""

from __future__ import annotations

from diffcli import families, prompts
from diffcli.errors import UsageError

LATENT_FILLS = ("latent-noise", "latent-nothing")  # masked.py's modes: they noise latents with scheduler.add_noise
# What to do instead of a U-Net-only setting on a transformer model (SD3, FLUX.1, Qwen-Image, Z-Image).
UNET_ONLY_HINTS = {
    "--hires": "generate at the size you want with --width/--height",
    "--refiner": "leave --refiner out",
    "--deep-cache": "leave --deep-cache out",
    "--variation-seed": "vary --seed instead",
}


def check(job, spec, scheduler: str | None, adapters) -> list[str]:
    """Refuse (UsageError) what the family of `spec` cannot do for `job`, with `scheduler` (a table name or None) and
    the resolved `adapters`; return the warning lines for what it reads otherwise."""
    family = families.of(spec)  # (the generic family: with the folder's pipeline classes)
    _check_task(job.task, spec, family)
    if adapters.loras and not family.lora:
        raise UsageError(f"--lora: {spec.name!r} ({_kind(spec)}) loads no LoRAs: its pipeline has no load_lora_weights",
                         "leave --lora and <lora:...> tags out")
    if scheduler:
        from diffcli.pipeline import check_scheduler, normalize_scheduler_name

        check_scheduler(normalize_scheduler_name(scheduler), spec)
    if family.denoiser != "unet":
        _unet_only(job, spec)
    fill = getattr(job.inputs, "fill", None)
    if family.flow_match and fill in LATENT_FILLS:
        raise UsageError(f"--fill: {spec.name!r} ({spec.family}) is a flow-matching model, whose scheduler cannot noise "
                         f"latents as the latent fills need, got {fill}", "use --fill original or fill")
    style = families.call_style(family.pipelines.get(job.task, ""))
    _check_sequence_length(job.prompt.max_sequence_length, spec, style)
    _check_clip_skip(job.prompt.clip_skip, spec)
    _check_true_cfg(job, spec, family, style)
    return [] if style.prompt_embeds else _own_prompts(job, spec, style, adapters)


def _check_sequence_length(length: int | None, spec, style) -> None:
    """--max-sequence-length only where the pipeline takes max_sequence_length, within what its check_inputs allows."""
    if length is None:
        return
    if style.max_sequence_length is None:
        raise UsageError(f"--max-sequence-length: {spec.name!r} ({spec.family}) encodes prompts with CLIP only, in "
                         f"chunks of 77 tokens, got {length}",
                         f"it works with {', '.join(families.taking('max_sequence_length'))} models")
    if style.max_sequence_length and length > style.max_sequence_length:
        raise UsageError(f"--max-sequence-length: {spec.family} pipelines take at most {style.max_sequence_length} "
                         f"tokens, got {length}")
    positions = _encoder_positions(spec) if not style.max_sequence_length else None
    if positions and length > positions:  # the pipeline pads to this length: past the encoder's positions, a typo
        raise UsageError(f"--max-sequence-length: {spec.name!r}'s text encoder takes at most {positions} tokens, "
                         f"got {length}")


def _check_clip_skip(clip_skip: int | None, spec) -> None:
    """--clip-skip within the CLIP text encoder's layers (the bundled model's has 4): past them, an index error."""
    from diffcli.models import component_config

    layers = component_config(spec, "text_encoder/config.json").get("num_hidden_layers")
    if clip_skip and isinstance(layers, int) and clip_skip > layers:
        raise UsageError(f"--clip-skip: {spec.name!r}'s text encoder has {layers} layers, got {clip_skip}",
                         f"at most {layers}")


def _encoder_positions(spec) -> int | None:
    """The text encoder's max_position_embeddings (its config's, or its text_config's), when its config is at hand."""
    from diffcli.models import component_config

    config = component_config(spec, "text_encoder/config.json")
    value = config.get("max_position_embeddings") or (config.get("text_config") or {}).get("max_position_embeddings")
    return value if isinstance(value, int) and value > 0 else None


def _check_true_cfg(job, spec, family, style) -> None:
    """--true-cfg only where --cfg is a distilled guidance beside a true CFG pass (FLUX.1), and with a negative prompt."""
    scale = job.sampling.true_cfg
    if scale is None:
        return
    if not style.takes_true_cfg:
        if style.true_cfg:
            why = "its --cfg already is true CFG (the pipeline's true_cfg_scale)"
        elif family.guidance == "cfg":
            why = "its --cfg already is classifier-free guidance with --negative"
        else:
            why = "its pipeline has no true CFG"
        raise UsageError(f"--true-cfg: {spec.name!r} ({spec.family}) takes none: {why}, got {scale:g}",
                         f"--true-cfg works with {', '.join(families.taking('takes_true_cfg'))} models; "
                         + ("leave it out" if why.startswith("its pipeline") else "use --cfg"))
    if scale > 1 and not job.prompt.negative.strip():
        raise UsageError(f"--true-cfg {scale:g} needs --negative: {spec.family} pipelines run true CFG only with a "
                         "negative prompt", "give --negative TEXT, or leave --true-cfg out")


def _check_task(task: str, spec, family) -> None:
    """The family has a pipeline for the task (edit: an instruction-editing model), and the packages it needs."""
    if task == "edit" and task not in family.pipelines:
        also = "; `diffcli img2img` changes an image with this one" if family.img2img else ""
        raise UsageError(f"edit: {spec.name!r} ({spec.family}) cannot edit from an instruction",
                         f"edit runs {families.EDIT_MODELS}{also}")
    if task not in family.pipelines and ("edit" in family.pipelines or spec.pipeline):  # (others: pipeline_class_name)
        raise UsageError(f"{task} does not work with {spec.name!r} ({_kind(spec)} model)", family.task_hint)
    from diffcli import extras

    for module in family.requires:
        if not extras.available(module):
            raise UsageError(f"{spec.name!r} ({spec.family}) needs the package {module}, which is not installed",
                             f"pip install {module} (the version matching your torch)")


def _unet_only(job, spec) -> None:
    """Refuse the settings that work on a U-Net only (second passes, DeepCache's hooks, variation noise's layout)."""
    from diffcli import refiner

    used = {"--hires": job.second.hires, "--refiner": refiner.active(job.second), "--deep-cache": job.model.deep_cache,
            "--variation-seed": job.sampling.variation_seed is not None}
    for flag, value in used.items():
        if value:
            what = "its own pipeline" if spec.pipeline else "a transformer"
            raise UsageError(f"{flag}: works with U-Net models (SD 1.x, 2.x, XL) only, got {spec.name!r} "
                             f"({spec.family}, {what})", UNET_ONLY_HINTS[flag])


def _own_prompts(job, spec, style, adapters) -> list[str]:
    """A pipeline that encodes the prompt strings itself: no embeddings, --clip-skip only where it takes one; warnings
    for attention brackets it reads as text, a negative prompt it ignores, and a --cfg it does not use."""
    prompt, family = job.prompt, _kind(spec)
    if adapters.embeddings:
        raise UsageError(f"--embedding: textual inversion works with the CLIP prompts diffcli encodes (SD 1.x, 2.x, XL), "
                         f"got {spec.name!r} ({family}) for {adapters.embeddings[0][1]}", "leave --embedding out")
    if (prompt.clip_skip or 1) > 1 and not style.clip_skip:
        raise UsageError(f"--clip-skip: {spec.name!r} ({family}) takes no CLIP skip, got {prompt.clip_skip}",
                         "leave --clip-skip out")
    warnings = []
    texts = (prompt.text, prompt.negative)
    if style.weighted_t5 and prompt.weighting and any(prompts.has_break(text) for text in texts):
        warnings.append(f"BREAK has no meaning for {family} models (their T5 reads one sequence): dropped")
    elif prompt.weighting and not style.weighted_t5 and any(prompts.is_weighted(text) for text in texts):
        warnings.append(f"{family} models read attention brackets like (word:1.2) and BREAK as plain text: their "
                        "pipeline encodes the prompt itself (--no-weighting silences this)")
    if not style.negative_prompt and prompt.negative.strip() and not (job.sampling.true_cfg or 0) > 1:
        hint = " (--true-cfg above 1 turns it on)" if style.takes_true_cfg else ""
        why = ("its pipeline takes no negative prompt" if style.takes is not None  # a generic one
               else "their pipeline's CFG reads an empty negative prompt" if spec.guidance == "cfg"  # FLUX.2 klein base
               else f"diffcli runs them without true CFG{hint}")
        warnings.append(f"--negative has no effect on {family} models: {why}")
    cfg = job.sampling.cfg
    used_cfg = spec.defaults.get("cfg") if cfg is None else cfg  # the --cfg the run takes
    if style.cfg_off is not None and prompt.negative.strip() and used_cfg is not None and used_cfg <= style.cfg_off:
        warnings.append(f"--negative has no effect on {family} models at --cfg {used_cfg:g}: their pipeline reads the "
                        f"negative prompt only above --cfg {style.cfg_off:g}")
    if spec.guidance == "none" and cfg:
        warnings.append(f"--cfg {cfg:g} has no effect on {spec.name}: it takes no guidance (as FLUX.1 schnell)")
    elif style.takes is not None and "guidance_scale" not in style.takes and cfg is not None:
        warnings.append(f"--cfg {cfg:g} has no effect on {spec.name}: its pipeline takes no guidance_scale")
    return warnings


def _kind(spec) -> str:
    """The family as messages name it: the generic one with its pipeline class."""
    return f"{spec.family} {spec.pipeline}" if spec.pipeline else spec.family
