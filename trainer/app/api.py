"""HTTP API under ``/shinkansen/v1`` (SPEC §11), mounted on gradio's FastAPI app.

The standalone server and the WebUI adapter (``on_app_started``) both call :func:`register_api`.
Settings travel as the same JSON as presets and run files (our keys or TrainTrain's), so the API
has no parameter list of its own, and they are read strictly: an unknown key is refused, as the
CLI's ``--set`` refuses it (TrainTrain's ignored keys excepted). User errors come back as
``{"detail": "<one line>"}`` with 400 (bad input, malformed JSON included), 404 (no such job or
preset) or 409 (duplicate name, job in the wrong state).

Auth: HTTP basic against ``auth`` -- ``(user, password)``, a list of them, ``{user: password}``
or the WebUI's ``--api-auth`` text ``"user:pass,user2:pass2"``; ``None`` leaves the API open
(the standalone server binds 127.0.0.1 unless told otherwise).
"""
from __future__ import annotations

import secrets
from dataclasses import asdict
from typing import Any, Optional, Union

from fastapi import APIRouter, Body, Depends, HTTPException
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from fastapi.security import HTTPBasic, HTTPBasicCredentials

from ..errors import UserError
from .jobs import DuplicateJob, JobNotFound, JobQueue
from .plot import list_runs, read_loss_csv, series_dict
from ..presets import PresetNotFound, list_presets, load_named_preset
from ..settings import FIELDS, Settings

PREFIX = "/shinkansen/v1"

Auth = Union[None, str, tuple, list, dict]


def parse_auth(auth: Auth) -> dict[str, str]:
    """Every accepted spelling of credentials → ``{user: password}``."""
    if not auth:
        return {}
    if isinstance(auth, dict):
        return {str(k): str(v) for k, v in auth.items()}
    if isinstance(auth, str):
        pairs = [p.split(":", 1) for p in auth.split(",") if p.strip()]
        if any(len(p) != 2 for p in pairs):
            raise UserError("auth: write user:password (several separated by commas)")
        return {u.strip(): pw.strip() for u, pw in pairs}
    if isinstance(auth, tuple) and len(auth) == 2 and all(isinstance(x, str) for x in auth):
        return {auth[0]: auth[1]}
    return {str(u): str(p) for u, p in auth}


def _guard(credentials: dict[str, str]):
    basic = HTTPBasic(auto_error=False)

    def check(given: Optional[HTTPBasicCredentials] = Depends(basic)) -> None:
        if not credentials:
            return
        ok = given is not None and given.username in credentials and secrets.compare_digest(
            given.password.encode(), credentials[given.username].encode())
        if not ok:
            raise HTTPException(401, "incorrect or missing credentials", headers={"WWW-Authenticate": "Basic"})
    return check


def _errors(fn):
    """User errors → HTTP status with a one-line ``detail``."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (JobNotFound, PresetNotFound) as e:
            raise HTTPException(404, str(e)) from None
        except DuplicateJob as e:
            raise HTTPException(409, str(e)) from None
        except UserError as e:
            raise HTTPException(400, str(e)) from None
    return wrapper


class _OneLineRoute(APIRoute):
    """FastAPI answers JSON it cannot parse, or a path/query value of the wrong type, with 422 and a list
    of errors; our clients get 400 and one line like every other user error. Per route, not an app-wide
    handler: in the WebUI the app and its other routes are not ours."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def handle(request):
            try:
                return await handler(request)
            except RequestValidationError as e:
                return JSONResponse({"detail": _validation_line(e.errors())}, status_code=400)
        return handle


def _validation_line(errors: list) -> str:
    """FastAPI's first validation error as ``where: why`` on one line (pydantic 1 and 2 spellings)."""
    first = errors[0] if errors else {}
    loc = [str(x) for x in first.get("loc", ())]
    if "json" in str(first.get("type", "")):   # value_error.jsondecode (pydantic 1), json_invalid (2)
        why = (first.get("ctx") or {}).get("error") or first.get("msg", "")
        line = f"body: not valid JSON ({why})"
    else:
        line = f"{loc[-1] if loc else 'request'}: {first.get('msg', 'invalid value')}"
    return " ".join(line.split())


def _json_type(value: Any) -> str:
    """The JSON name of a parsed body value's type, for messages and type checks."""
    if isinstance(value, bool):
        return "boolean"
    for kind, name in ((dict, "object"), (list, "array"), (str, "string"), (int, "integer"),
                       (float, "number"), (type(None), "null")):
        if isinstance(value, kind):
            return name
    return "a body that is not JSON (send it with Content-Type: application/json)"


def _body_object(body: Any, example: str) -> dict:
    """``body`` when it is a JSON object; a one-line error naming what was sent otherwise."""
    if not isinstance(body, dict):
        raise UserError(f"body: expected a JSON object like {example}, got {_json_type(body)}")
    return body


def _check_keys(body: dict, types: dict[str, str]) -> dict:
    """Refuse keys outside ``types`` (key → JSON type name) and values of another type."""
    for key, value in body.items():
        if key not in types:
            raise UserError(f"{key}: unknown key; this body takes {', '.join(types)}")
        if _json_type(value) != types[key]:
            raise UserError(f"{key}: expected {types[key]}, got {_json_type(value)}")
    return body


def _save_flag(body: Any) -> bool:
    """``{"save": bool}`` of the stop routes (no body: false)."""
    if body is None:
        return False
    return _check_keys(_body_object(body, '{"save": true}'), {"save": "boolean"}).get("save", False)


def register_api(app, queue: JobQueue, host, auth: Auth = None) -> APIRouter:
    """Add the routes to ``app`` (a FastAPI app: gradio's in standalone, the WebUI's in the WebUI)."""
    router = APIRouter(prefix=PREFIX, tags=["shinkansen"], dependencies=[Depends(_guard(parse_auth(auth)))],
                       route_class=_OneLineRoute)

    def status() -> dict:
        """``running``: the running job (as in ``GET /jobs``) or null; ``pending``: the waiting jobs' ids in
        queue order, ``pending_count`` their number."""
        jobs = queue.list()
        running_id = queue.running_job_id
        running = next((j.to_dict(with_settings=False) for j in jobs if j.id == running_id), None)
        pending = [j.id for j in jobs if j.state == "pending"]
        return {"paused": queue.paused, "running": running, "pending": pending, "pending_count": len(pending),
                "progress": asdict(queue.progress.snapshot())}

    router.add_api_route("/status", _errors(status), methods=["GET"], summary="queue state and live progress")

    def jobs() -> list:
        return [j.to_dict(with_settings=False) for j in queue.list()]
    router.add_api_route("/jobs", _errors(jobs), methods=["GET"], summary="all jobs, in queue order")

    def add(body: Any = Body(None), front: bool = False) -> dict:
        """Body: the settings object itself, or ``{"settings": {...}, "front": bool}``."""
        body = _body_object(body, '{"settings": {...}, "front": false} or the settings object itself')
        settings_data = body
        if "settings" in body:
            _check_keys(body, {"settings": "object", "front": "boolean"})
            settings_data, front = body["settings"], body.get("front", front)
        job = queue.add(Settings.from_dict(settings_data, strict=True), front=front)
        return job.to_dict()
    router.add_api_route("/jobs", _errors(add), methods=["POST"], status_code=201, summary="add a job")

    def get(job_id: int) -> dict:
        job = queue.get(job_id).to_dict()
        if queue.running_job_id == job_id:
            job["progress"] = asdict(queue.progress.snapshot())
        return job
    router.add_api_route("/jobs/{job_id}", _errors(get), methods=["GET"], summary="one job with its settings")

    def delete(job_id: int) -> dict:
        return queue.delete(job_id).to_dict(with_settings=False)
    router.add_api_route("/jobs/{job_id}", _errors(delete), methods=["DELETE"], summary="delete a job")

    def move(job_id: int, body: Any = Body(None)) -> list:
        by = _check_keys(_body_object(body, '{"by": -1}'), {"by": "integer"}).get("by")
        if by is None:
            raise UserError('by: missing; send {"by": -1} to move the job one place earlier')
        return [j.to_dict(with_settings=False) for j in queue.move(job_id, by)]
    router.add_api_route("/jobs/{job_id}/move", _errors(move), methods=["POST"],
                         summary='reorder a pending job: {"by": -1} moves it one place earlier')

    def requeue(job_id: int, resume: bool = False) -> dict:
        return queue.requeue(job_id, resume=resume).to_dict(with_settings=False)
    router.add_api_route("/jobs/{job_id}/requeue", _errors(requeue), methods=["POST"],
                         summary="put a finished or interrupted job back in the queue "
                                 "(?resume=true: continue from its saved training state)")

    def loss(job_id: int) -> dict:
        job = queue.get(job_id)
        csv = job.result.get("csv") or (queue.progress.snapshot().csv if queue.running_job_id == job_id else None)
        if not csv:
            raise JobNotFound(f"job #{job_id} has no loss log yet")
        return series_dict(read_loss_csv(csv))
    router.add_api_route("/jobs/{job_id}/loss", _errors(loss), methods=["GET"], summary="the job's loss series")

    def stop(body: Any = Body(None)) -> dict:
        return {"stopped": queue.stop(save=_save_flag(body))}
    router.add_api_route("/stop", _errors(stop), methods=["POST"],
                         summary='stop the running job ({"save": true} saves it first); the queue goes on')

    def stop_all(body: Any = Body(None)) -> dict:
        return {"stopped": queue.stop_all(save=_save_flag(body)), "paused": True}
    router.add_api_route("/stop-all", _errors(stop_all), methods=["POST"], summary="stop and pause the queue")

    def pause() -> dict:
        queue.pause()
        return status()
    router.add_api_route("/queue/pause", _errors(pause), methods=["POST"], summary="start no new job")

    def resume() -> dict:
        queue.resume()
        return status()
    router.add_api_route("/queue/resume", _errors(resume), methods=["POST"], summary="run pending jobs")

    def presets() -> list:
        return list_presets(host.presets_dir)
    router.add_api_route("/presets", _errors(presets), methods=["GET"], summary="preset names")

    def preset(name: str) -> dict:
        return load_named_preset(name, host.presets_dir).to_dict("ours")
    router.add_api_route("/presets/{name}", _errors(preset), methods=["GET"], summary="a preset's settings")

    def runs() -> list:
        return [str(p.relative_to(host.logs_dir)) for p in list_runs(host.logs_dir)]
    router.add_api_route("/runs", _errors(runs), methods=["GET"], summary="loss CSVs in the logs folder")

    def schema() -> list:
        return [{"name": f.name, "kind": f.kind, "default": f.to_json(f.default), "label": f.label, "help": f.help,
                 "modes": list(f.modes), "group": f.group, "second_pass": f.second_pass,
                 "choices": list(f.choices), "traintrain": f.traintrain} for f in FIELDS]
    router.add_api_route("/schema", _errors(schema), methods=["GET"], summary="every setting: type, default, help")

    def dataset(request: Request) -> dict:
        """The Dataset panel's view of a folder: ``?folder=DIR&page=0&per_page=48`` plus any dataset setting
        (``image_size=768,512``…) parsed as ``--set`` does; histogram and repeats as training plans them."""
        from .dataset_panel import overview_json
        return overview_json(request.query_params)
    router.add_api_route("/dataset", _errors(dataset), methods=["GET"],
                         summary="a training folder: images, captions, repeats, buckets (as training plans them)")

    app.include_router(router)
    return router
