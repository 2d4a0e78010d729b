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
from pathlib import Path

from diffcli import flags, output
from diffcli.errors import RuntimeFailure, UsageError

AUTO = "auto"
AUTO_URL = "http://127.0.0.1:7860"  # `diffcli serve`'s default address
AUTO_TIMEOUT_S = 0.5  # --server auto: a local server answers its health check well within this
TIMEOUT_S = 3600.0  # one request may wait in the queue and run long (big models on a CPU)
LOCAL = {"out", "overwrite"}  # the client's own: where and how it writes
IGNORED = {"device": "the server's workers choose the device", "threads": "the server's --threads is used",
           "optimize": "the server decides", "low_vram": "the server decides",
           "lora_dir": "the server's --lora-dir is used", "embedding_dir": "the server has none"}
REFUSED = {"vae", "lora", "embedding", "model_config", "allow_pickle"}  # local files: the server cannot read them
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
        if name in LOCAL or value is None or (flag is not None and value == flag.default):
            continue
        if name in REFUSED:
            raise UsageError(f"{flag.long if flag else name} names a local file the server cannot read",
                             "give the server the file (its --models-dir or --lora-dir) and name it there")
        if name in IGNORED:
            say(f"--server: ignoring {flag.long if flag else name} ({IGNORED[name]})")
            continue
        if name in IMAGE_KEYS:
            body[name] = _read_image(name, value)
        elif flag is not None and flag.kind == "sweep":
            body[name] = _sweep_text(name, value)
        else:
            body[name] = list(value) if isinstance(value, tuple) else value
    return body


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
    with _request(url, "/diffcli/v1/jobs", body) as response:
        for line in response:
            event = json.loads(line)
            if event["event"] == "error":
                raise (UsageError if event.get("exit_code") == 2 else RuntimeFailure)(f"server: {event['message']}")
            if event["event"] == "done":
                break
            records.append(_write(event, paths, planned, values, overwrite, to_stdout, as_json))
    if grid and records and not to_stdout:
        from diffcli.sweep import write_grid

        sheet = write_grid(records, overwrite)
        output.emit_line(json.dumps(sheet, sort_keys=True) if as_json else sheet["grid"])


def _write(event: dict, paths: list, planned: list, values: dict, overwrite: bool, to_stdout: bool, as_json: bool) -> dict:
    """One streamed image: the record made local (input paths as given here), encoded and written as run._save does."""
    from PIL import Image

    record, number, index = event["record"], event["job"], event["index"]
    timings = record.pop("timings", {})
    for name in IMAGE_KEYS:
        if name in record and values.get(name):
            record[name] = values[name]
    image = Image.open(io.BytesIO(base64.b64decode(event["png"])))
    image.load()
    began = time.perf_counter()
    if to_stdout:
        sys.stdout.buffer.write(output.encode_image(image, Path("image.png"), record))
        sys.stdout.buffer.flush()
        return record
    path, template, fields = paths[number][index]
    data = output.encode_image(image, path, record)
    with output.signals_held():
        written = output.write_new(path, data, overwrite, output.renumber(template, fields, record["seed"], index + 1))
    result = dict(record, path=str(written), timings=dict(timings, save_s=round(time.perf_counter() - began, 3)))
    output.emit_line(json.dumps(result, sort_keys=True) if as_json else str(written))
    return result


def _plan_paths(planned: list, out: str | None, overwrite: bool) -> list:
    """Per job, per image: (path, template, fields), decided as plan.plan_jobs decides them (same names, same checks)."""
    result, seen, offset = [], set(), 0
    for job in planned:
        seeds, fields = job["seeds"], job["fields"]
        template = output.name_template(out, len(seeds))
        paths = output.plan_paths(out, seeds, fields, overwrite, offset)
        for path in paths:
            if path in seen:
                raise UsageError(f"--out {out or output.DEFAULT_DIR!r} gives several images the name {path}",
                                 "use a folder, or a template with {index}, or with {cfg}, {steps}, {seed} or {scheduler}")
            seen.add(path)
        result.append([(path, template, fields) for path in paths])
        offset += len(seeds)
    return result


def _check_stdout(planned: list, as_json: bool) -> None:
    if sum(len(job["seeds"]) for job in planned) != 1:
        raise UsageError("--out - writes one image to stdout, got several", "use a folder or a template")
    if as_json:
        raise UsageError("--out - and --json both want stdout", "drop one of them")
    if sys.stdout.isatty():
        raise UsageError("--out - would write PNG bytes to the terminal", "redirect stdout: > image.png")


def _read_image(name: str, value: str) -> str:
    from diffcli.options import check_path

    flag = name.upper() if name == "input" else f"--{name}"
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

