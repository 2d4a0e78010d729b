"""`diffcli serve`: a warm model behind AUTOMATIC1111's web API and diffcli's own, and the client that uses it.

A request travels as a local run does: its JSON (A1111's fields, or a batch line) -> jobs.build -> plan (every check;
bad input is 422 before it is queued) -> a worker's run.images (the same steps as `diffcli txt2img`) -> PNG bytes
with the same metadata. Rooms: start (`diffcli serve`'s options and checks, uvicorn), catalog (model names), intake
(request -> plans, limits), worker (queue, workers, progress), a1111 (its shapes), app (HTTP routes, auth), client
(`--server URL`).
"""
