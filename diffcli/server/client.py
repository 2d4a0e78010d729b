"""`--server URL`: send a command's jobs to a running `diffcli serve`, write the images here exactly as a local run
names, checks and writes them (no overwrite without --overwrite, atomic, same metadata, same stdout lines).

Imports no torch, diffusers or HTTP library: the point is a fast start (urllib from the standard library).
"""

from __future__ import annotations

import base64
import csv
import io
import json
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from diffcli import flags, output
from diffcli.errors import RuntimeFailure, UsageError

AUTO = "auto"
AUTO_URL = "http://127.0.0.1:7860"  # `diffcli serve`'s default address
AUTO_TIMEOUT_S = 0.5  # --server auto: a local server answers its health check well within this
TIMEOUT_S = 3600.0  # one request may wait in the queue and run long (big models on a CPU)
LOCAL = {"out", "overwrite"}  # the client's own: where and how it writes
IGNORED = {"device": "the server's workers choose the device", "threads": "the server's --threads is used",
           "optimize": "the server decides", "low_vram": "the server decides", "backend": "the server decides",
           "lora_dir": "the server's --lora-dir is used", "embedding_dir": "the server has none"}
REFUSED = {"vae", "lora", "embedding", "model_config", "allow_pickle", "base", "ip_encoder"}  # local files: the server cannot read them
IMAGE_KEYS = ("input", "mask")


def server_url(value: str) -> str | None:
    """The server to use: --server URL, or with `auto` the local default when it answers (None: run locally)."""
    if value.strip().lower() != AUTO:
        parts = urllib.parse.urlsplit(value.strip())
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise UsageError(f"--server {value!r} is not an http(s) URL", "e.g. http://127.0.0.1:7860, or auto")
        return value.strip().rstrip("/")
    try:
        _request(AUTO_URL, "/diffcli/v1/health", None, AUTO_TIMEOUT_S).close()
    except RuntimeFailure:
        return None
    return AUTO_URL


def request_values(command: str, values: dict, say) -> dict:
    """The options a user set (not the declared defaults) as a job line; files read and sent as base64."""
    body = {"command": command}
    declared = flags.COMMANDS[command]
    for name, value in values.items():
        flag = declared.get(name)
        if name in LOCAL or value in (None, [], ()) or (flag is not None and value == flag.default):
            continue
        if name in REFUSED:
            raise UsageError(f"{flag.long if flag else name} names a local file the server cannot read",
                             "give the server the file (its --models-dir or --lora-dir) and name it there")
        if name in IGNORED:
            say(f"--server: ignoring {flag.long if flag else name} ({IGNORED[name]})")
            continue
        if name in IMAGE_KEYS:
            body[name] = _read_image(name, value)
        elif name == "image":  # edit's reference images
            body[name] = [_read_image(name, each) for each in value]
        elif name == "control":  # each unit's image sent along; its model is a name from the server's --controlnet-dir
            body["controlnet"] = [_control_unit(text) for text in value]
        elif name == "ip_adapter":  # each adapter with its image (sent along) and scale; a name in its --controlnet-dir
            body["ip_adapter"] = _ip_units(values)
        elif name in ("ip_image", "ip_scale"):
            continue
        elif name == "prompt_sr" and isinstance(value, str):
            continue  # one cell of a batch's sweep: its prompt is already replaced (sent, it would be swept again)
        elif flag is not None and flag.kind == "sweep":
            body[name] = _sweep_text(name, value)
        else:
            body[name] = list(value) if isinstance(value, tuple) else value
    return body


@dataclass
class RemotePlan:
    """What a batch needs of a job planned on the server (plan.Plan's fields of the same names)."""

    job: object  # jobs.Job, as built here
    seeds: list[int]
    paths: list[Path]
    name_template: str
    name_fields: dict


def batch(url: str, options, say) -> int:
    """`diffcli batch --server URL`: jobs, seeds, names and the manifest here (resumable as a local batch); each job
    planned and run on the server; finished images recorded as they arrive."""
    from diffcli import jobs
    from diffcli.batch import prepare_jobs
    from diffcli.batch.lines import BatchJob, assign_seeds, claim_paths
    from diffcli.batch.manifest import mark_finished, record, record_base_seed
    from diffcli.batch.processes import Ranks, StopOnSignal
    from diffcli.errors import Interrupted

    if options.processes > 1 or options.dry_run:
        raise UsageError("batch --server runs on the server's workers: --processes and --dry-run are for local batches",
                         "drop --server for a dry run")
    pairs, manifest, base, how, out = prepare_jobs(options, Ranks())
    items, bodies, owners = [], [], {}
    for number, (entry, job, from_base) in enumerate(assign_seeds(pairs, base, out)):
        values = jobs.values_of(job)
        body = request_values(job.command, values, say)
        try:
            planned = _json(_request(url, "/diffcli/v1/plan", body))["jobs"][0]
        except UsageError as exc:
            raise UsageError(f"{entry.where}: {exc.message}", exc.hint) from None
        template = output.name_template(job.output.out, len(planned["seeds"]))
        paths = output.plan_paths(job.output.out, planned["seeds"], planned["fields"], True)
        claim_paths(owners, paths, entry.where, entry.line)
        plan = RemotePlan(job, planned["seeds"], paths, template, planned["fields"])
        items.append(BatchJob(number, entry.line, plan, planned["ids"], from_base=from_base))
        bodies.append((body, values))
    record_base_seed(manifest, base)
    mark_finished(items, manifest, options.force, say)
    todo = sum(len(item.pending) for item in items)
    say(f"batch on {_safe(url)}: {len(items)} job(s), {sum(len(i.ids) for i in items)} image(s); base seed {base} "
        f"({how}); {todo} to make")
    made = 0
    with StopOnSignal(say) as stop:
        for item, (body, values) in zip(items, bodies):
            if stop.requested:
                break
            if not item.pending:
                continue
            for event in _stream(url, body):
                index = event["index"]
                if index not in item.pending:  # made before (the server makes the whole job again)
                    continue
                path = item.plan.paths[index]
                result = _write_image(event, path, item.plan.name_template, item.plan.name_fields, values,
                                      item.plan.job.output.overwrite)
                manifest.append(record(item, item.ids[index], Path(result["path"]), result["seed"]))
                made += 1
                result = dict(result, id=item.ids[index], job=item.number, line=item.line, index=index)
                output.emit_line(json.dumps(result, sort_keys=True) if options.as_json else result["path"])
                if stop.requested:
                    break
    if stop.requested:
        raise Interrupted(f"interrupted: {made} image(s) made and recorded in {manifest.path}; "
                          "run the same command again to make the rest")
    say(f"batch: made {made} image(s)")
    return 0


def generate(url: str, command: str, values: dict, as_json: bool, quiet: bool, grid: bool) -> None:
    """The command run on the server: plan there, name and check the files here, then stream, write and report."""
    def say(message: str) -> None:
        if not quiet:
            print(message, file=sys.stderr)

    out, overwrite = values.get("out"), bool(values.get("overwrite"))
    body = request_values(command, values, say)
    planned = _json(_request(url, "/diffcli/v1/plan", body))["jobs"]
    to_stdout = out == "-"
    if to_stdout:
        _check_stdout(planned, as_json)
    paths = [] if to_stdout else _plan_paths(planned, out, overwrite)
    count = sum(len(job["seeds"]) for job in planned)
    say(f"server {_safe(url)}: {count} image(s), seed {planned[0]['seeds'][0]}" if planned else f"server {_safe(url)}")
    records = []
    for event in _stream(url, body):
        if to_stdout:
            record = _local_record(event, values)
            output.write_stdout(output.encode_image(_decode(event), Path("image.png"), record))
            continue
        path, template, fields = paths[event["job"]][event["index"]]
        record = _write_image(event, path, template, fields, values, overwrite)
        output.emit_line(json.dumps(record, sort_keys=True) if as_json else record["path"])
        records.append(record)
    if grid and records and not to_stdout:
        from diffcli.sweep import write_grid

        sheet = write_grid(records, overwrite)
        output.emit_line(json.dumps(sheet, sort_keys=True) if as_json else sheet["grid"])


def _stream(url: str, body: dict):
    """The image events of a job run on the server, in order; its error event as our error."""
    with _request(url, "/diffcli/v1/jobs", body) as response:
        for line in response:
            event = json.loads(line)
            if event["event"] == "error":
                raise (UsageError if event.get("exit_code") == 2 else RuntimeFailure)(f"server: {event['message']}")
            if event["event"] == "done":
                return
            yield event
    raise RuntimeFailure("the server closed the connection before the job was done")


def _local_record(event: dict, values: dict) -> dict:
    """The image's record as a local run writes it: input files named as given here (`values`: the job's option
    values), not as the server kept them."""
    record = dict(event["record"])
    for name in IMAGE_KEYS:
        if name in record and values.get(name):
            record[name] = values[name]
    if record.get("images") and values.get("image"):  # edit's reference images
        record["images"] = list(values["image"])
    if record.get("ip_adapter") and values.get("ip_adapter"):  # each adapter and image as named here
        record["ip_adapter"] = [dict(unit, model=model, image=image) for unit, model, image
                                in zip(record["ip_adapter"], values["ip_adapter"], values.get("ip_image") or [])]
        record.pop("ip_encoder", None)  # the server's folder
    if record.get("control") and values.get("control"):  # each unit's image and model as named here
        from diffcli.controlnet import parse

        record["control"] = [dict(unit, image=mine.image, model=mine.model or unit["model"])  # none: the server's default
                             for unit, mine in zip(record["control"], map(parse, values["control"]))]
    return record


def _decode(event: dict):
    from PIL import Image

    image = Image.open(io.BytesIO(base64.b64decode(event["png"])))
    image.load()
    return image


def _write_image(event: dict, path: Path, template: str, fields: dict, values: dict, overwrite: bool) -> dict:
    """One streamed image written as run._save writes it (atomic, never over a file without overwrite, renumbered
    when a {index} name was taken meanwhile); its record with path and timings."""
    record = _local_record(event, values)
    timings = record.pop("timings", {})
    began = time.perf_counter()
    data = output.encode_image(_decode(event), path, record)
    with output.signals_held():
        written = output.write_new(path, data, overwrite, output.renumber(template, fields, record["seed"],
                                                                           event["index"] + 1))
    return dict(record, path=str(written), timings=dict(timings, save_s=round(time.perf_counter() - began, 3)))


def _plan_paths(planned: list, out: str | None, overwrite: bool) -> list:
    """Per job, per image: (path, template, fields), decided as plan.plan_jobs decides them (same names, same checks)."""
    result, seen, offset = [], set(), 0
    for job in planned:
        seeds, fields = job["seeds"], job["fields"]
        template = output.name_template(out, len(seeds))
        paths = output.plan_paths(out, seeds, fields, overwrite, offset)
        output.check_distinct(paths, seen, out)
        result.append([(path, template, fields) for path in paths])
        offset += len(seeds)
    return result


def _check_stdout(planned: list, as_json: bool) -> None:
    count = sum(len(job["seeds"]) for job in planned)
    if count != 1:
        raise UsageError(f"--out - writes one image to stdout, got {count}", "use a folder or a template")
    output.check_stdout(as_json)


def _ip_units(values: dict) -> list[dict]:
    """The --ip-adapter/--ip-image/--ip-scale values as the server's units: checked here, each image read and sent;
    the model by its file name, which the server looks up in its --controlnet-dir."""
    from diffcli.ip_adapter import parse
    from diffcli.jobs import Adapters

    adapters = parse(Adapters(ip_adapter=list(values.get("ip_adapter") or []), ip_image=list(values.get("ip_image") or []),
                              ip_scale=list(values.get("ip_scale") or [])))
    return [{"model": Path(a.model).name, "image": _read_image("ip-image", a.image), "scale": a.scale} for a in adapters]


def _control_unit(text: str) -> dict:
    """A --control text as the server's unit: checked here, its image read and sent."""
    from diffcli.controlnet import parse

    unit = parse(text)
    return {"type": unit.type, "params": dict(unit.params), "image": _read_image("control", unit.image),
            "model": unit.model, "weight": unit.weight, "start": unit.start, "end": unit.end, "resize": unit.resize}


def _read_image(name: str, value: str) -> str:
    from diffcli.options import check_path

    flag = {"input": "INPUT", "control": "--control image"}.get(name, f"--{name}")
    check_path(flag, value)
    try:
        return base64.b64encode(Path(value).read_bytes()).decode()
    except FileNotFoundError:
        raise UsageError(f"{flag} {value}: no such file") from None
    except IsADirectoryError:
        raise UsageError(f"{flag} {value}: is a folder, not an image") from None
    except OSError as exc:
        raise UsageError(f"{flag} {value}: cannot read it: {exc.strerror}") from None


def _sweep_text(name: str, values) -> str:
    """A swept option's values as the comma list its flag parses (Prompt S/R as one CSV row)."""
    if not isinstance(values, (list, tuple)):  # one value (a drawn seed)
        return str(values)
    if name == "prompt_sr":
        buffer = io.StringIO()
        csv.writer(buffer).writerow(values)
        return buffer.getvalue().strip()
    return ",".join(str(value) for value in values)


def _safe(url: str) -> str:
    """The URL without its password, for messages."""
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", ""))


def _request(url: str, route: str, body: dict | None, timeout: float = TIMEOUT_S):
    """POST (or GET without a body) with Basic auth from the URL's user:pass; errors as one line."""
    parts = urllib.parse.urlsplit(url)
    target = _safe(url).rstrip("/") + route
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(target, data=data, headers={"Content-Type": "application/json"})
    if parts.username is not None:
        credentials = f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
        request.add_header("Authorization", "Basic " + base64.b64encode(credentials.encode()).decode())
    try:
        return urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        try:
            detail = json.loads(exc.read()).get("detail") or exc.reason
        except (ValueError, AttributeError):
            detail = exc.reason
        if exc.code in (401, 403):
            raise UsageError(f"server {_safe(url)}: {detail}", "put user:password in the URL: http://user:pass@host:port") from None
        if exc.code in (413, 422):
            raise UsageError(f"server: {detail}") from None
        raise RuntimeFailure(f"server {_safe(url)} answered {exc.code}: {detail}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise RuntimeFailure(f"cannot reach the server at {_safe(url)}: {reason}",
                             "start it with `diffcli serve`, or use --server auto to run here when it is down") from None


def _json(response) -> dict:
    with response:
        try:
            return json.loads(response.read())
        except ValueError:
            raise RuntimeFailure("the server's answer is not JSON (is the URL a diffcli server?)") from None

