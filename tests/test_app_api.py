"""The standalone app's HTTP API (/shinkansen/v1) and crash recovery, against `python -m trainer` subprocesses."""
import json

import pytest

from app_server import AppServer, make_root, tiny_job
from trainer.settings import Settings, SettingsError
from trainer.world import toy

AUTH = ("tester", "s3cret")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ds")
    toy.make_dataset(folder, 4, seed=1, image_size=64)
    return folder


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = AppServer(make_root(tmp_path_factory.mktemp("ext")), auth=AUTH).start()
    yield srv
    srv.stop()


def api(srv, method, path, body=None, **kw):
    return srv.request(method, path, body, auth=AUTH, **kw)


def names(srv):
    return [(j["name"], j["state"]) for j in api(srv, "GET", "/jobs")[1]]


def test_without_credentials_the_api_answers_401(server):
    assert server.request("GET", "/jobs")[0] == 401
    assert server.request("GET", "/jobs", auth=("tester", "wrong"))[0] == 401
    assert server.request("POST", "/stop", {})[0] == 401
    status, body = api(server, "GET", "/jobs")
    assert status == 200 and isinstance(body, list)
    assert "LoRA" in api(server, "GET", "/presets")[1]


def test_an_unknown_settings_key_is_refused_with_the_clis_message(server, dataset):
    with pytest.raises(SettingsError) as cli:
        Settings.defaults().apply_set_args(["train_iteratons=5"])
    api(server, "POST", "/queue/pause")
    for body in ({**tiny_job(dataset, "unknown-key"), "train_iteratons": 5},
                 {"settings": {**tiny_job(dataset, "unknown-key"), "train_iteratons": 5}, "front": True}):
        status, err = api(server, "POST", "/jobs", body)
        assert (status, err) == (400, {"detail": str(cli.value)})
        assert "did you mean train_iterations" in err["detail"]
    assert "unknown-key" not in [name for name, _ in names(server)]
    status, job = api(server, "POST", "/jobs", {**tiny_job(dataset, "ignored-key"), "logging_dir": "x"})
    assert status == 201                                     # a TrainTrain key it never read: still accepted
    assert api(server, "DELETE", f"/jobs/{job['id']}")[0] == 200
    api(server, "POST", "/queue/resume")


@pytest.mark.parametrize("method, path, body", [
    ("POST", "/jobs", b'{"mode": "LoRA",'),                  # invalid JSON
    ("POST", "/jobs", b'[{"mode": "LoRA"}]'),                # a list
    ("POST", "/jobs", b'"LoRA"'),                            # a string
    ("POST", "/jobs", b''),                                  # nothing
    ("POST", "/jobs", b'{"settings": [JOB]}'),
    ("POST", "/jobs", b'{"settings": JOB, "front": "yes"}'),     # JOB: settings that are fine
    ("POST", "/jobs", b'{"settings": JOB, "frnt": true}'),
    ("POST", "/jobs/1/move", b'{"by": "up"}'),
    ("POST", "/jobs/1/move", b'[-1]'),
    ("POST", "/jobs/1/move", b'{}'),
    ("POST", "/stop", b'{"save": "yes"}'),
    ("POST", "/stop-all", b'"save"'),
    ("POST", "/jobs/first/requeue", None),
    ("POST", "/jobs/1/requeue?resume=perhaps", None),
])
def test_a_malformed_request_answers_400_with_one_line(server, dataset, method, path, body):
    job = json.dumps(tiny_job(dataset, "malformed")).encode()
    status, err = api(server, method, path, raw=body if body is None else body.replace(b"JOB", job))
    assert status == 400 and isinstance(err, dict) and list(err) == ["detail"]
    assert isinstance(err["detail"], str) and "\n" not in err["detail"] and ": " in err["detail"]


def test_a_missing_preset_is_404_and_names_it(server):
    status, err = api(server, "GET", "/presets/NoSuchPreset")
    assert status == 404 and "'NoSuchPreset' not found" in err["detail"] and "LoRA" in err["detail"]
    status, preset = api(server, "GET", "/presets/LoRA")
    assert status == 200 and preset["mode"] == "LoRA"


def test_api_adds_lists_reorders_deletes_and_stops_jobs(server, dataset):
    api(server, "POST", "/queue/pause")                      # keep jobs pending while we rearrange them
    status, a = api(server, "POST", "/jobs", tiny_job(dataset, "api-a", steps=100000))
    assert status == 201 and a["state"] == "pending" and a["settings"]["train_iterations"] == 100000
    status, b = api(server, "POST", "/jobs", {"settings": tiny_job(dataset, "api-b"), "front": False})
    assert status == 201
    status, err = api(server, "POST", "/jobs", tiny_job(dataset, "API-A"))
    assert status == 409 and err["detail"].startswith("save_lora_name:") and "\n" not in err["detail"]
    status, err = api(server, "POST", "/jobs", tiny_job(dataset / "missing", "api-c"))
    assert status == 400 and "lora_data_directory" in err["detail"]
    status, err = api(server, "POST", "/jobs", {**tiny_job(dataset, "api-d"), "train_iterations": "many"})
    assert status == 400 and err["detail"].startswith("train_iterations:")
    assert names(server) == [("api-a", "pending"), ("api-b", "pending")]
    status = api(server, "GET", "/status")[1]
    assert (status["running"], status["pending"], status["pending_count"]) == (None, [a["id"], b["id"]], 2)

    assert api(server, "POST", f"/jobs/{b['id']}/move", {"by": -1})[0] == 200
    assert names(server) == [("api-b", "pending"), ("api-a", "pending")]
    assert api(server, "DELETE", f"/jobs/{b['id']}")[0] == 200
    assert api(server, "DELETE", f"/jobs/{b['id']}")[0] == 404
    assert names(server) == [("api-a", "pending")]

    api(server, "POST", "/queue/resume")
    server.wait(lambda: (api(server, "GET", "/status")[1]["progress"]["step"] or 0) >= 2, what="api-a training")
    status, job = api(server, "GET", f"/jobs/{a['id']}")
    assert job["state"] == "running" and job["progress"]["total"] == 100000
    status = api(server, "GET", "/status")[1]
    assert (status["running"]["id"], status["running"]["name"], status["running"]["state"]) == (a["id"], "api-a", "running")
    assert (status["pending"], status["pending_count"]) == ([], 0)
    assert api(server, "DELETE", f"/jobs/{a['id']}")[0] == 400            # running: stop it first
    assert api(server, "POST", "/stop", {})[1] == {"stopped": a["id"]}
    server.wait(lambda: api(server, "GET", f"/jobs/{a['id']}")[1]["state"] == "stopped", what="api-a stopped")
    loss = api(server, "GET", f"/jobs/{a['id']}/loss")[1]
    assert len(loss["steps"]) >= 2 and len(loss["loss"]) == len(loss["steps"]) and loss["lr"][0] > 0
    status, body = api(server, "POST", f"/jobs/{a['id']}/requeue?resume=true")   # no save_state: nothing to resume
    assert status == 400 and "saved no training state" in str(body)
    assert api(server, "POST", f"/jobs/{a['id']}/requeue")[1]["state"] == "pending"


def test_a_crash_leaves_the_running_job_interrupted_and_loses_nothing_else(tmp_path, dataset):
    root = make_root(tmp_path / "ext")
    srv = AppServer(root).start()
    try:
        _, first = srv.request("POST", "/jobs", tiny_job(dataset, "crash-done", steps=2))
        srv.wait(lambda: srv.request("GET", f"/jobs/{first['id']}")[1]["state"] == "done", what="first job done")
        _, running = srv.request("POST", "/jobs", tiny_job(dataset, "crash-running", steps=100000))
        _, waiting = srv.request("POST", "/jobs", tiny_job(dataset, "crash-waiting", train_learning_rate=3e-4))
        srv.wait(lambda: srv.request("GET", "/status")[1]["progress"]["step"] >= 2, what="steps of the long job")
        srv.kill()                                           # SIGKILL: no cleanup, like a crash
        srv = AppServer(root).start()
        jobs = {j["name"]: j for j in srv.request("GET", "/jobs")[1]}
        assert jobs["crash-running"]["state"] == "interrupted" and "interrupted" in jobs["crash-running"]["message"]
        assert jobs["crash-waiting"]["state"] == "pending" and jobs["crash-done"]["state"] == "done"
        assert srv.request("GET", f"/jobs/{waiting['id']}")[1]["settings"]["train_learning_rate"] == 3e-4
        status = srv.request("GET", "/status")[1]
        assert status["paused"] and status["running"] is None       # nothing starts unasked after a restart
        assert (root / "output" / "crash-done.safetensors").is_file()
        assert srv.request("POST", f"/jobs/{running['id']}/requeue")[1]["state"] == "pending"
        assert [j["state"] for j in srv.request("GET", "/jobs")[1]] == ["pending", "pending", "done"]
    finally:
        srv.stop()
