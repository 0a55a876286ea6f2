"""The bad-image corpus (tests/badimages.py) end to end: each image goes through a live
backend's `generate` and gets its typed error, or becomes a job that ends properly, and the
backend stays up throughout."""

from __future__ import annotations

from collections import Counter

from backend.errors import BackendError, ErrorCode
from tests.badimages import bad_image_cases
from tests.reliability.support import WAIT, record

TYPED = {c.value for c in ErrorCode} - {"internal"}


def _send_all(client, cases, outcomes: dict[str, str]) -> list[tuple[str, str]]:
    """Submit every case; returns (case name, job id) of the accepted ones."""
    accepted = []
    for case in cases:
        try:
            job_id = client.generate(case.data, {"preset": "fast"}, filename=f"{case.name}.img")
        except BackendError as err:
            assert err.hint, case.name
            outcomes[case.name] = err.code.value
            continue
        accepted.append((case.name, job_id))
    return accepted


def test_every_bad_image_gets_a_typed_answer_from_a_live_backend(backend_proc, make_server):
    cases = bad_image_cases()
    assert len(cases) >= 30
    default = [c for c in cases if c.limits is None]
    custom = [c for c in cases if c.limits is not None]
    outcomes: dict[str, str] = {}

    b = backend_proc("preview", "--queue-depth", "200")  # the real engine, own process
    accepted = _send_all(b.client, default, outcomes)
    for limits in {c.limits for c in custom}:  # limits are server settings: one server each
        s = make_server("preview", image_limits=limits)
        same = [c for c in custom if c.limits == limits]
        assert _send_all(s.client, same, outcomes) == []

    job_outcomes: dict[str, dict] = {}
    for name, job_id in accepted:
        final = b.client.wait_for_job(job_id, WAIT)
        job_outcomes[name] = final
        outcomes[name] = final["event"] if final["event"] == "job_done" else final.get("code")

    for case in cases:
        got = outcomes[case.name]
        if case.expect.startswith("ok:"):
            # A readable image becomes a job; the job ends with a GLB or, when the preview
            # engine finds no subject in it, a typed failure with a hint (never a crash).
            final = job_outcomes.get(case.name)
            assert final is not None, f"{case.name} was refused: {got}"
            if final["event"] != "job_done":
                assert final["event"] == "job_failed" and final["code"] in TYPED, final
                assert final.get("hint"), final
        else:
            assert got == case.expect, f"{case.name}: expected {case.expect}, got {got}"

    refused = [c for c in cases if not c.expect.startswith("ok:")]
    folders = {j["job_id"] for j in b.client.jobs(limit=1000)["jobs"]}
    assert folders == {job_id for _, job_id in accepted}  # a refused image leaves no job behind
    assert b.client.ping()["pong"] is True and b.alive()
    assert b.stop() == 0
    record(
        "bad_images",
        {
            "cases": len(cases),
            "refused_with_expected_code": len(refused),
            "accepted": len(accepted),
            "jobs_done": sum(1 for f in job_outcomes.values() if f["event"] == "job_done"),
            "jobs_failed_typed": sum(1 for f in job_outcomes.values() if f["event"] != "job_done"),
            "by_outcome": dict(Counter(outcomes.values())),
            "per_case": outcomes,
            "backend_crashes": 0,
        },
    )
