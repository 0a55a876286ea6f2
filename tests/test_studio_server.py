"""The studio server end to end with real components: a real redis-server, a gateway process
and two GPU-worker processes (CPU engines stand in for two GPUs), artists' sessions through
`backend.wire.remote`. Loopback only; every wait is bounded.

Without redis-server these tests fail (CI installs it); TRELLIS2_SKIP_REDIS=1 skips them.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
import zmq

from backend.checks import glbcheck
from backend.errors import BackendError
from backend.params import parse_params
from backend.procutil import pid_alive
from backend.store.jobs import JobStore
from backend.wire import curvekeys
from backend.wire.client import ClientTimeout
from backend.wire.protocol import ConnectionInfo, read_connection_file
from backend.wire.remote import RemoteBackend
from tests.cluster import SKIP_ENV, Cluster, RecordingProxy, wait_for
from tests.conftest import png_bytes

pytestmark = [
    pytest.mark.skipif(os.environ.get(SKIP_ENV) == "1", reason=f"{SKIP_ENV}=1"),
    pytest.mark.skipif(os.name != "posix", reason="POSIX signals and processes"),
    pytest.mark.timeout(240),
]

WAIT = 60.0  # generous: CI has two slow cores
SLOW = "tests.cpu_engines:SlowEngine"


def _start(cluster: Cluster, users=("alice", "bob"), workers=(("w1", 24), ("w2", 48))):
    strings = {name: cluster.add_user(name) for name in users}
    cluster.start_gateway()
    for gpu, (name, vram) in enumerate(workers):
        cluster.start_worker(name, vram_gb=vram, gpu=gpu)
    cluster.wait_workers([name for name, _ in workers])
    return strings


def _connect(string: str, cluster: Cluster) -> RemoteBackend:
    """A session once the gateway lists every worker (it refreshes its list each second)."""
    remote = RemoteBackend(string)
    wait_for(
        lambda: len(remote.status(timeout=10)["workers"]) == len(cluster.workers),
        WAIT,
        "the gateway to list the workers",
        step=0.2,
    )
    return remote


@pytest.fixture(scope="module")
def preview(tmp_path_factory):
    cluster = Cluster(tmp_path_factory.mktemp("preview"), engine="preview")
    sessions: list[RemoteBackend] = []
    try:
        strings = _start(cluster)

        def session(user: str) -> RemoteBackend:
            remote = _connect(strings[user], cluster)
            sessions.append(remote)
            return remote

        cluster.session = session
        cluster.strings = strings
        yield cluster
    finally:
        for remote in sessions:
            remote.close()
        cluster.close()


@pytest.fixture(scope="module")
def slow(tmp_path_factory):
    # 3 stages x 10 steps x 0.1 s: long enough to cancel, kill or restart around a job.
    cluster = Cluster(
        tmp_path_factory.mktemp("slow"),
        engine=SLOW,
        engine_options={"steps": "10", "step_seconds": "0.1"},
        queue_depth=2,
    )
    try:
        cluster.strings = _start(cluster, users=("alice",), workers=(("s1", 24), ("s2", 24)))
        cluster.remote = _connect(cluster.strings["alice"], cluster)
        yield cluster
    finally:
        if getattr(cluster, "remote", None) is not None:
            cluster.remote.close()
        cluster.close()


def _store(cluster: Cluster) -> JobStore:
    return JobStore(cluster.store)


# -- the main flow ------------------------------------------------------------------------------


def test_two_artists_three_sessions_generate_on_two_workers(preview):
    sessions = {
        "alice-1": preview.session("alice"),
        "alice-2": preview.session("alice"),
        "bob": preview.session("bob"),
    }
    results: dict[str, list] = {}
    errors: list[BaseException] = []

    def artist(label: str, remote: RemoteBackend) -> None:
        try:
            ids = [remote.generate(png_bytes(), {"preset": "fast", "seed": i}) for i in range(2)]
            events: list = []
            outcomes = [remote.wait_for_job(j, WAIT, on_event=events.append) for j in ids]
            glbs = [remote.download(j) for j in ids]
            results[label] = [ids, outcomes, glbs, events]
        except BaseException as exc:  # surfaced by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=artist, args=item) for item in sessions.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT * 2)
    assert not errors, errors
    store = _store(preview)
    workers = set()
    for label, (ids, outcomes, glbs, events) in results.items():
        assert [o["event"] for o in outcomes] == ["job_done", "job_done"], outcomes
        for job_id, glb in zip(ids, glbs, strict=True):
            record = store.get(job_id)
            assert record.state.value == "done"
            assert record.extra["user"] == label.split("-")[0]
            workers.add(record.extra["worker"])
            assert glb == store.path(job_id, "result.glb").read_bytes()
            glbcheck.validate_glb(glb)  # raises on a broken GLB
        progress = {e.content["job_id"] for e in events if e.msg_type == "job_progress"}
        assert progress & set(ids), f"{label} saw no progress of its jobs"
    assert workers == {"w1", "w2"}, "both GPU workers should have run jobs"
    history = sessions["bob"].jobs(limit=50)["jobs"]
    listed = {j["job_id"]: j for j in history}
    for ids, *_ in results.values():
        for job_id in ids:
            assert listed[job_id]["state"] == "done" and listed[job_id]["worker"] in workers


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads /proc/<pid>/environ")
def test_each_worker_pins_its_own_backend_to_its_gpu(preview):
    for name, gpu in (("w1", "0"), ("w2", "1")):
        info = read_connection_file(preview.folder / "workers" / name / "run" / "backend.json")
        environ = Path(f"/proc/{info.pid}/environ").read_bytes().split(b"\0")
        assert f"CUDA_VISIBLE_DEVICES={gpu}".encode() in environ, name


def test_texture_and_reexport_through_the_gateway(preview):
    remote = preview.session("alice")
    parent = remote.generate(png_bytes(), {"preset": "fast"})
    assert remote.wait_for_job(parent, WAIT)["event"] == "job_done"
    mesh = remote.download(parent)

    textured = remote.texture(png_bytes(), mesh, "glb", {"preset": "fast"})
    assert remote.wait_for_job(textured, WAIT)["event"] == "job_done"
    glbcheck.validate_glb(remote.download(textured))

    again = remote.reexport(parent, {"texture_size": 512})
    assert remote.wait_for_job(again, WAIT)["event"] == "job_done"
    store = _store(preview)
    record = store.get(again)
    assert record.kind == "reexport" and record.parent == parent
    assert record.final_params["texture_size"] == 512
    assert record.extra["worker"] == store.get(parent).extra["worker"]  # where the cache is
    glbcheck.validate_glb(remote.download(again))

    with pytest.raises(BackendError) as refused:
        remote.reexport(parent, {"resolution": 1024})
    assert refused.value.code.value == "bad_params"


def test_cancel_is_refused_for_another_artists_job(preview):
    alice, bob = preview.session("alice"), preview.session("bob")
    job_id = alice.generate(png_bytes(), {"preset": "fast"})
    with pytest.raises(BackendError, match="belongs to alice"):
        bob.cancel(job_id)
    alice.wait_for_job(job_id, WAIT)


def test_card_size_routes_jobs_and_refuses_what_no_worker_has(preview):
    remote = preview.session("alice")
    big = remote.generate(png_bytes(), {"preset": "fast"}, min_vram_gb=40)
    assert remote.wait_for_job(big, WAIT)["event"] == "job_done"
    assert _store(preview).get(big).extra["worker"] == "w2"  # the only card with 40+ GB

    before = len(_store(preview).list()[0])
    with pytest.raises(BackendError) as refused:
        remote.generate(png_bytes(), {"preset": "fast"}, min_vram_gb=80)
    error = refused.value
    assert error.code.value == "engine_unavailable"
    assert "at least 80 GB" in error.message and "48 GB" in error.message
    assert len(_store(preview).list()[0]) == before  # nothing was written or queued


def test_download_comes_in_bounded_chunks_and_stays_in_the_job_folder(preview):
    remote = preview.session("alice")
    job_id = remote.generate(png_bytes(), {"preset": "fast"})
    remote.wait_for_job(job_id, WAIT)
    path = _store(preview).path(job_id, "result.glb")
    sent_before = remote.status()["requests"].get("fetch", 0)
    blob = remote.download(job_id, chunk=64 * 1024)
    chunks = remote.status()["requests"]["fetch"] - sent_before
    assert blob == path.read_bytes()
    assert chunks == -(-len(blob) // (64 * 1024))  # ceil: one request per chunk
    reply, data = remote.fetch(job_id, "result.glb", 0, length=1 << 30)
    assert len(data) == min(len(blob), 4 << 20) and reply["size"] == len(blob)

    (path.parent / "link.glb").symlink_to(path)
    for name in ("../job.json", "link.glb", ".hidden", "job.json/.."):
        with pytest.raises(BackendError) as refused:
            remote.fetch(job_id, name, 0)
        assert refused.value.code.value == "not_found", name
    assert remote.fetch(job_id, "thumbnail.png", 0)[1].startswith(b"\x89PNG")


def test_history_pages_by_offset_and_query_like_a_local_backend(preview):
    remote = preview.session("bob")
    ids = [remote.generate(png_bytes(), {"preset": "fast"}, filename=f"p{i}.png") for i in (1, 2)]
    for job_id in ids:
        remote.wait_for_job(job_id, WAIT)
    first = remote.client.request("jobs", {"limit": 1, "offset": 0})
    second = remote.client.request("jobs", {"limit": 1, "offset": 1})
    total = len(_store(preview).list()[0])
    assert first["total"] == second["total"] == total >= 2
    assert first["jobs"][0]["job_id"] != second["jobs"][0]["job_id"]
    assert first["next"] == first["jobs"][0]["job_id"]  # more pages follow
    found = remote.client.request("jobs", {"limit": 10, "query": "P2.png done"})
    assert found["total"] == 1 and found["jobs"][0]["job_id"] == ids[1]
    entry = found["jobs"][0]
    assert entry["user"] == "bob" and entry["bytes"] > 0
    assert entry["thumbnail"].endswith("thumbnail.png") and "input." in entry["input"]
    with pytest.raises(BackendError):
        remote.client.request("jobs", {"limit": 1, "offset": -1})


# -- keys and the wire ---------------------------------------------------------------------------


def _stranger(cluster: Cluster) -> str:
    """A well-formed connection string whose key the gateway never authorized."""
    known = curvekeys.decode_connection(cluster.strings["alice"])
    public, secret = zmq.curve_keypair()
    return curvekeys.RemoteConnection(
        **{
            **known.__dict__,
            "public_key": public.decode(),
            "secret_key": secret.decode(),
            "user": "mallory",
        }
    ).encode()


def test_unknown_key_is_refused_before_any_request_is_read(preview):
    alice = preview.session("alice")
    before = alice.status()
    with RemoteBackend(_stranger(preview)) as stranger:
        with pytest.raises(ClientTimeout):
            stranger.hello(timeout=2.0)
        with pytest.raises(ClientTimeout):
            stranger.generate(png_bytes(), timeout=2.0)
    after = alice.status()
    assert after["auth_failures"] > before["auth_failures"]
    # Only alice's own status requests reached a handler.
    assert after["requests"].get("hello", 0) == before["requests"].get("hello", 0)
    assert after["requests"].get("generate", 0) == before["requests"].get("generate", 0)
    assert sum(after["rejected"].values()) == sum(before["rejected"].values())


def test_a_removed_key_is_refused_at_its_next_request(preview):
    string = preview.add_user("carol")
    wait_for(lambda: _can_hello(string), WAIT, "carol's key to be loaded", step=0.3)
    with RemoteBackend(string) as carol:
        assert carol.hello()["user"] == "carol"
        curvekeys.remove_user(preview.home, "carol")
        # The gateway looks at the folder every heartbeat; the open connection stays up.
        wait_for(lambda: _revoked(carol), WAIT, "carol's key to be revoked", step=0.3)
        with pytest.raises(BackendError, match="no longer authorized"):
            carol.generate(png_bytes())


def _revoked(remote: RemoteBackend) -> bool:
    try:
        remote.ping()
    except BackendError as exc:
        if "no longer authorized" in exc.message:
            return True
        raise
    return False


def _can_hello(string: str) -> bool:
    with RemoteBackend(string) as remote:
        try:
            return remote.hello(timeout=1.0)["ok"]
        except ClientTimeout:
            return False


def test_the_wire_carries_no_plaintext(preview, make_server):
    conn = curvekeys.decode_connection(preview.strings["alice"])
    shell_port, events_port = preview.port, preview.port + 1
    proxies = [RecordingProxy(shell_port), RecordingProxy(events_port)]
    try:
        routed = conn.with_endpoints(
            f"tcp://127.0.0.1:{proxies[0].port}", f"tcp://127.0.0.1:{proxies[1].port}"
        )
        with RemoteBackend(routed) as remote:
            image = png_bytes()
            job_id = remote.generate(image, {"preset": "fast"}, filename="secret-name.png")
            remote.wait_for_job(job_id, WAIT)
            glb = remote.download(job_id)
        wire = b"".join(p.bytes() for p in proxies)
    finally:
        for proxy in proxies:
            proxy.close()
    assert len(wire) > len(glb)  # the result really went through the proxy
    assert b"CURVE" in wire  # the ZMTP greeting names the mechanism
    for plain in (b'"msg_type"', b"<TRELLIS2|MSG>", b"secret-name", b"\x89PNG", b"glTF", b'"ok"'):
        assert plain not in wire, plain
    assert image[16:64] not in wire and glb[20:80] not in wire

    # The same recorder in front of a plain local backend does see the JSON: it can fail.
    local = make_server(engine="preview")
    proxy = RecordingProxy(local.info.shell_port)
    try:
        info = read_connection_file(local.config.connection_file)
        routed_local = ConnectionInfo(**{**info.__dict__, "shell_port": proxy.port})
        from backend.wire.client import Client

        with Client(routed_local, subscribe=False) as client:
            client.hello()
        assert b'"msg_type"' in proxy.bytes()
    finally:
        proxy.close()


# -- faults ---------------------------------------------------------------------------------------


def _all_done(remote: RemoteBackend, ids, timeout=WAIT) -> list[dict]:
    return [remote.wait_for_job(job_id, timeout) for job_id in ids]


def test_full_queue_answers_busy(slow):
    remote = slow.remote
    running = [remote.generate(png_bytes()) for _ in range(2)]
    wait_for(
        lambda: all(_store(slow).get(j).state.value == "running" for j in running),
        WAIT,
        "both workers to start",
    )
    waiting = [remote.generate(png_bytes()) for _ in range(2)]  # queue depth 2
    with pytest.raises(BackendError) as refused:
        remote.generate(png_bytes())
    assert refused.value.code.value == "busy" and refused.value.retryable
    outcomes = _all_done(remote, running + waiting)
    assert [o["event"] for o in outcomes] == ["job_done"] * 4


def test_cancel_reaches_the_running_job_and_the_queued_one(slow):
    remote = slow.remote
    ids = [remote.generate(png_bytes()) for _ in range(3)]
    store = _store(slow)
    wait_for(
        lambda: [store.get(j).state.value for j in ids].count("running") == 2,
        WAIT,
        "two jobs running",
    )
    queued = next(j for j in ids if store.get(j).state.value == "queued")
    running = next(j for j in ids if store.get(j).state.value == "running")
    assert remote.cancel(queued)["state"] == "cancelled"
    assert remote.cancel(running)["state"] == "cancelling"
    assert remote.wait_for_job(running, WAIT)["event"] == "job_cancelled"
    record = store.get(running)
    assert record.state.value == "cancelled"
    # The worker's own backend cancelled its copy: the cancel reached the running job.
    worker_store = JobStore(slow.folder / "workers" / record.extra["worker"] / "backend")
    assert worker_store.get(record.extra["local_job"]).state.value == "cancelled"
    assert store.get(queued).state.value == "cancelled" and "worker" not in store.get(queued).extra
    other = next(j for j in ids if j not in (queued, running))
    assert remote.wait_for_job(other, WAIT)["event"] == "job_done"


def test_gateway_restart_loses_no_queued_or_finished_job(slow):
    remote = slow.remote
    finished = remote.generate(png_bytes())
    assert remote.wait_for_job(finished, WAIT)["event"] == "job_done"
    finished_glb = remote.download(finished)
    ids = [remote.generate(png_bytes()) for _ in range(4)]  # 2 running, 2 queued
    store = _store(slow)
    wait_for(lambda: store.get(ids[0]).state.value != "queued", WAIT, "a job to start")
    slow.kill(slow.gateway)  # SIGKILL: nothing is saved on the way out
    # A job the dead gateway had written but not yet queued (it died in between):
    orphan = store.create(
        "generate", "slow", parse_params({}).to_dict(), image=png_bytes(), filename="o.png"
    ).id
    slow.start_gateway()
    wait_for(lambda: _answers(remote), WAIT, "the new gateway", step=0.2)
    outcomes = _all_done(remote, [*ids, orphan])
    assert [o["event"] for o in outcomes] == ["job_done"] * 5
    for job_id in [*ids, orphan]:
        assert len(store.get(job_id).extra["runs"]) == 1  # each ran once
    listed = {j["job_id"]: j["state"] for j in remote.jobs()["jobs"]}
    assert all(listed[j] == "done" for j in [finished, *ids])
    assert remote.download(finished) == finished_glb


def _answers(remote: RemoteBackend) -> bool:
    try:
        return remote.ping(timeout=1.0)["ok"] and bool(remote.status(timeout=2.0)["workers"])
    except ClientTimeout:
        return False


def test_a_stopping_worker_hands_its_job_to_the_other(slow):
    remote = slow.remote
    job_id = remote.generate(png_bytes())
    store = _store(slow)
    wait_for(lambda: store.get(job_id).extra.get("local_job"), WAIT, "the job to run")
    leaving = store.get(job_id).extra["worker"]
    staying = next(name for name in slow.workers if name != leaving)
    slow.stop(slow.workers[leaving])  # SIGTERM: Celery's warm shutdown
    assert slow.workers[leaving].returncode == 0, slow.log_tail(leaving)
    assert remote.wait_for_job(job_id, WAIT)["event"] == "job_done"
    record = store.get(job_id)
    assert record.extra["runs"] == [leaving, staying]
    assert record.recoveries == 0  # a planned stop is not a lost run
    slow.start_worker(leaving, vram_gb=24, gpu=0)  # back to two workers
    slow.wait_workers([leaving, staying])
    wait_for(lambda: len(remote.status()["workers"]) == 2, WAIT, "two workers listed", step=0.2)


def test_worker_killed_mid_job_runs_again_on_the_other_exactly_once(slow):
    remote = slow.remote
    events: list = []
    job_id = remote.generate(png_bytes())
    store = _store(slow)
    wait_for(
        lambda: (
            store.get(job_id).state.value == "running" and store.get(job_id).extra.get("local_job")
        ),
        WAIT,
        "the job to run",
    )
    victim, victim_local = store.get(job_id).extra["worker"], store.get(job_id).extra["local_job"]
    survivor = next(name for name in slow.workers if name != victim)
    backend_pid = read_connection_file(
        slow.folder / "workers" / victim / "run" / "backend.json"
    ).pid
    slow.kill(slow.workers[victim])  # kill -9 of the worker, mid-job

    outcome = remote.wait_for_job(job_id, WAIT, on_event=events.append)
    assert outcome["event"] == "job_done"
    record = store.get(job_id)
    assert record.state.value == "done" and record.recoveries == 1
    assert record.extra["runs"] == [victim, survivor]
    mine = [e for e in events if e.content.get("job_id") == job_id]
    assert [e.msg_type for e in mine].count("job_done") == 1
    assert any(e.msg_type == "job_retry" and e.content.get("worker") == victim for e in mine)
    # The killed worker's backend followed its parent, and never finished the job.
    wait_for(lambda: not pid_alive(backend_pid), 30, "the orphaned backend to exit")
    victim_store = JobStore(slow.folder / "workers" / victim / "backend")
    assert victim_store.get(victim_local).state.value != "done"
    assert glbcheck.validate_glb(remote.download(job_id))
