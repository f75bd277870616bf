"""Triton's model repository routes: load applies the bundle's updates and says so in the
server's log; unload is refused, the server serving its one bundle until it stops."""

from __future__ import annotations

import json
import shutil
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import tritonclient.http as triton

from tidal.runtime import checkpoint
from tidal.serving import Service, export, load_bundle, start_server


@pytest.fixture
def copy(bundle_dir, tmp_path) -> Path:
    """A copy of the bundle, which a test may export over or damage."""
    return Path(shutil.copytree(bundle_dir, tmp_path / "bundle"))


@pytest.fixture
def running(copy):
    server = start_server(Service(load_bundle(copy), name="ctr"))
    yield server
    server.stop()


def _post(server, path: str) -> tuple[int, dict]:
    request = urllib.request.Request(server.url + path, data=b"{}", method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_unload_is_refused_with_a_400_saying_the_server_serves_one_bundle_until_stopped(running):
    client = triton.InferenceServerClient(running.url.removeprefix("http://"))
    with pytest.raises(triton.InferenceServerException, match=r"\[400\] unload: tidal serve does not unload its model "
                                                              r"'ctr': it serves one bundle for its lifetime; stop the "
                                                              r"server \(Ctrl-C or SIGTERM\) to stop serving it"):
        client.unload_model("ctr")
    assert client.is_model_ready("ctr")  # still served
    code, answer = _post(running, "/v2/repository/models/other/unload")
    assert code == 404 and answer["error"] == "unknown model 'other'; this server serves 'ctr'"


def test_a_load_request_logs_what_it_changed_to_stdout_and_a_refusal_to_stderr(running, copy, trainer, capsys):
    code, answer = _post(running, "/v2/repository/models/ctr/load")
    assert (code, answer["applied"], answer["reload_reason"]) == (200, 0, None)
    nothing = capsys.readouterr()
    assert "tidal serve:" not in nothing.out + nothing.err  # no new delta: nothing changed, nothing to say
    export(trainer.run_dir, copy)  # a full export replaces the bundle
    code, answer = _post(running, "/v2/repository/models/ctr/load")
    assert code == 200 and answer["reload_reason"] == "was replaced by another full export"
    served = checkpoint.latest_name(trainer.run_dir)
    assert (answer["source_checkpoint"], answer["source_step"]) == (served, int(served.split("-")[1]))
    logged = capsys.readouterr()
    assert logged.out.startswith(f"tidal serve: loaded the bundle again (it was replaced by another full export), now "
                                 f"serving delta 0 of checkpoint {served} of run {trainer.run_id[:8]}: ")
    assert logged.err == ""
    (copy / "manifest.json").unlink()
    code, answer = _post(running, "/v2/repository/models/ctr/load")
    assert code == 409 and "manifest.json is missing" in answer["error"]
    logged = capsys.readouterr()
    assert logged.out == "" and logged.err == f"tidal serve: bundle not updated past delta 0: {copy}: not a serving bundle " \
                                              f"(manifest.json is missing); write one with tidal export\n"
