"""The add-on against a studio server, in real Blender-as-a-module: a real redis-server, a
gateway process and one GPU-worker process (the preview engine, paced so a job can be
cancelled), started by `tests/cluster.py` as the backend suite starts them. Preferences →
Backend: Remote Server with the connection string `gateway add-user` printed; then the
sidebar's operators as an artist uses them. Results reach Blender only through `fetch`.
Loopback only (127.0.0.1); every wait is bounded.

Without redis-server these tests fail (CI installs it); TRELLIS2_SKIP_REDIS=1 skips them.
"""

from __future__ import annotations

import os
import stat
import sys

import pytest

bpy = pytest.importorskip("bpy")

from ..cluster import SKIP_ENV, Cluster, free_port, server_python  # noqa: E402
from .conftest import EXAMPLE, MODULE, submodule  # noqa: E402
from .support import draw, labels_in, tick_until  # noqa: E402

pytestmark = [
    pytest.mark.bpy,
    pytest.mark.skipif(os.environ.get(SKIP_ENV) == "1", reason=f"{SKIP_ENV}=1"),
    pytest.mark.skipif(sys.platform == "win32", reason="POSIX processes"),
]

WAIT = 90.0  # generous: CI has two slow cores


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    python = server_python()
    if python is None:
        pytest.fail("no Python with celery and redis-py for the gateway (scripts/setup.sh)")
    cluster = Cluster(
        tmp_path_factory.mktemp("studio"),
        engine="tests.cpu_engines:PacedPreview",
        engine_options={"pause": "1.5"},
        python=python,
    )
    try:
        cluster.string = cluster.add_user("alice")
        cluster.start_gateway()
        cluster.start_worker("w1")
        yield cluster
    finally:
        cluster.close()


@pytest.fixture
def remote(studio, prefs, ctrl):
    """The add-on set to Remote Server and connected; the gateway lists its worker."""
    prefs.backend, prefs.connection = "REMOTE", studio.string
    assert ctrl.config.remote  # the preference's update applied it
    assert bpy.ops.trellis2.backend(action="START") == {"FINISHED"}  # blocking: background
    tick_until(ctrl, lambda: (ctrl.status().get("remote") or {}).get("workers"), WAIT)
    return ctrl


def _store_file(studio, job_id: str, name: str) -> bytes:
    return (studio.store / "jobs" / job_id / name).read_bytes()


def _labels(ctrl) -> list[str]:
    log = []
    for panel in ("main", "history", "queue"):
        log += draw(getattr(bpy.types, f"TRELLIS2_PT_{panel}"), bpy.context)
    prefs = bpy.context.preferences.addons[MODULE].preferences
    log += _draw_prefs(prefs)
    return [text for text, _ in labels_in(log)]


def _draw_prefs(prefs) -> list:
    from types import SimpleNamespace

    from .support import FakeLayout

    log: list = []
    fake = SimpleNamespace(
        layout=FakeLayout(log), backend=prefs.backend, connection=prefs.connection
    )
    type(prefs).draw(fake, bpy.context)
    return log


def test_generate_on_a_studio_server_is_downloaded_then_imported(scene, remote, studio):
    props = scene.trellis2
    props.filepath, props.preset = str(EXAMPLE), "fast"
    assert bpy.ops.trellis2.generate() == {"FINISHED"}  # waits in background mode
    obj = bpy.context.view_layer.objects.active
    assert obj is not None and obj.type == "MESH"
    job_id = obj["trellis2_job"]
    view = remote.find(job_id)
    assert view.state == "done" and view.imported
    # The model came through `fetch` into the private cache, byte for byte.
    cache = remote.files.folder
    assert os.path.commonpath([view.glb_path, str(cache)]) == str(cache)
    with open(view.glb_path, "rb") as f:
        assert f.read() == _store_file(studio, job_id, "result.glb")
    assert stat.S_IMODE(os.stat(cache).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(view.glb_path).st_mode) == 0o600
    status = remote.status()
    assert status["pid"] is None  # no backend process on this machine
    assert "Studio server" in remote.next_engine()
    assert not (remote.config.output_dir / "jobs").exists()  # nothing written locally
    assert remote.tick_errors == []


def test_cancel_reaches_the_job_on_the_server(scene, remote, studio):
    view = remote.submit(EXAMPLE.read_bytes(), {"preset": "fast"}, "duck")
    tick_until(remote, lambda: view.state == "running", WAIT)
    assert bpy.ops.trellis2.cancel(job_id=view.key) == {"FINISHED"}
    tick_until(remote, lambda: view.terminal, WAIT)
    assert view.state == "cancelled"
    record = (studio.store / "jobs" / view.job_id / "job.json").read_text()
    assert '"cancelled"' in record
    assert not view.imported


def test_history_pages_and_thumbnails_come_from_the_server(scene, remote, studio):
    for seed in (1, 2):
        view = remote.submit(EXAMPLE.read_bytes(), {"preset": "fast", "seed": seed}, "duck")
        view.auto_import = False
    tick_until(remote, lambda: not remote.active_jobs(), WAIT)
    entries = remote.history_blocking()
    on_server = os.listdir(studio.store / "jobs")
    assert sorted(e["job_id"] for e in entries) == sorted(on_server)  # fewer than a page
    assert remote.history.total == len(on_server) >= 3
    assert all(e.get("user") == "alice" for e in entries)
    newest = entries[0]
    tick_until(remote, lambda: newest.get("thumbnail_file"), WAIT)
    with open(newest["thumbnail_file"], "rb") as f:
        assert f.read() == _store_file(studio, newest["job_id"], "thumbnail.png")
    # Paging: one job a page, the second page is the second newest job.
    remote.history.page_size = 1
    remote.history_page(1)
    tick_until(remote, lambda: not remote.history.stale and remote.history.request is None)
    assert [e["job_id"] for e in remote.history.entries] == [entries[1]["job_id"]]
    assert remote.history.pages == len(on_server)
    # Import from the history: downloaded, then imported (the script waits with wait()).
    before = set(bpy.data.objects)
    done = next(e["job_id"] for e in entries if e["state"] == "done")
    assert bpy.ops.trellis2.import_result(job_id=done) == {"FINISHED"}
    assert bpy.ops.trellis2.wait() == {"FINISHED"}
    new = [o for o in bpy.data.objects if o not in before]
    assert [o.get("trellis2_job") for o in new if o.type == "MESH"] == [done]


def test_reexport_and_texture_through_the_server(scene, remote, studio):
    props = scene.trellis2
    props.filepath, props.preset = str(EXAMPLE), "fast"
    assert bpy.ops.trellis2.generate() == {"FINISHED"}
    parent = bpy.context.view_layer.objects.active["trellis2_job"]
    props.texture_size = "512"
    assert bpy.ops.trellis2.reexport(job_id=parent) == {"FINISHED"}
    assert bpy.ops.trellis2.wait() == {"FINISHED"}
    again = bpy.context.view_layer.objects.active
    child = remote.find(again["trellis2_job"])
    assert child.kind == "reexport" and child.parent == parent and child.state == "done"
    assert child.glb_path.startswith(str(remote.files.folder))

    bpy.ops.mesh.primitive_cube_add(location=(3, 0, 0))
    cube = bpy.context.view_layer.objects.active
    assert bpy.ops.trellis2.texture_mesh(result="COPY") == {"FINISHED"}  # waits: background
    textured = [o for o in bpy.data.objects if o.get("trellis2_texture_job")]
    assert len(textured) == 1 and textured[0] is not cube
    textured = textured[0]
    job = remote.find(textured["trellis2_texture_job"])
    assert job.kind == "texture" and job.state == "done"
    assert textured.active_material is not None
    assert remote.tick_errors == []


def test_local_only_actions_refuse_with_a_reason(scene, remote, monkeypatch):
    operators = submodule("operators")
    said: list[str] = []
    refuse = operators._refuse
    monkeypatch.setattr(
        operators, "_refuse", lambda cls, text: said.append(text) or refuse(cls, text)
    )
    for op in ("doctor", "open_log", "open_folder", "delete_job", "clear_history"):
        assert not getattr(bpy.ops.trellis2, op).poll(), op
    assert said == [submodule("controller").REMOTE_ONLY_LOCAL] * 5
    with pytest.raises(Exception, match="admin"):
        remote.delete_jobs(older_than_days=0)
    scene.trellis2.filepath = str(EXAMPLE)
    assert bpy.ops.trellis2.generate.poll()  # the sidebar's own actions stay available


@pytest.mark.parametrize("fault", ["bad string", "unknown key", "gateway down"])
def test_connection_errors_are_clear_and_never_block(
    scene, studio, prefs, ctrl, fault, monkeypatch
):
    import zmq

    from backend.wire import curvekeys

    known = curvekeys.decode_connection(studio.string)
    if fault == "bad string":
        string = "a password pasted by mistake"
    elif fault == "unknown key":
        public, secret = zmq.curve_keypair()
        string = curvekeys.RemoteConnection(
            **{**known.__dict__, "public_key": public.decode(), "secret_key": secret.decode()}
        ).encode()
    else:
        port = free_port()
        string = known.with_endpoints(f"tcp://127.0.0.1:{port}", f"tcp://127.0.0.1:{port + 1}")
        string = string.encode()
        monkeypatch.setattr(submodule("remotelink"), "HELLO_TIMEOUT", 1.0)
    prefs.backend, prefs.connection = "REMOTE", string
    ctrl.start()  # returns at once; the tick finds out
    tick_until(ctrl, lambda: ctrl.state == "dead" and ctrl.last_error, 30)
    expected = {
        "bad string": "not a TRELLIS.2 server connection string",
        "unknown key": "refused this connection string's key",
        "gateway down": "no answer from alice@127.0.0.1",
    }[fault]
    assert expected in ctrl.last_error and ctrl.last_hint
    labels = _labels(ctrl)
    assert any(expected in text for text in labels)
    # What was pasted (a credential) is never echoed: not the string, not its secret key.
    secrets = [string, curvekeys.decode_connection(studio.string).secret_key]
    assert not any(secret in text for text in labels for secret in secrets)
    # Generate is refused with the reason, never sent into the void.
    assert ctrl.tick_errors == []


def test_a_gateway_restart_makes_the_link_wait_then_go_on(scene, remote, studio, monkeypatch):
    monkeypatch.setattr(submodule("remotelink"), "STATUS_TIMEOUT", 1.0)
    session = remote.supervisor.session
    studio.stop(studio.gateway)
    tick_until(remote, lambda: remote.state == "starting", 30)
    assert "stopped answering" in remote.status()["reason"]
    view = remote.submit(EXAMPLE.read_bytes(), {"preset": "fast"}, "duck")
    for _ in range(5):
        submodule("runtime").timer()
    assert view.state == "waiting"  # held until the server answers again: never lost
    studio.start_gateway()
    tick_until(remote, lambda: view.terminal, WAIT)
    assert view.state == "done" and view.imported
    assert remote.supervisor.session != session  # the new gateway process was noticed
    assert remote.tick_errors == []
