"""The console's Pipelines page (issue #27), in a real browser: the team's pipelines, a run's steps, the
comparison, and Approve / Reject, which the API allows only to a key whose owner is a listed approver.

The run is made on the test stack as tests/stack/pipelines/test_pipelines.py makes one: a pipeline whose
eval passes a tuned model (the local Bedrock's tuned models answer with ":ft:" in the text), new data under
its prefix, a manual run, driven to its approval step.
"""
import time
import urllib.request

import httpx
import openai
import pytest
from helpers import http, register_graders, rft
from sample_data import arithmetic_rows, jsonl
from test_console import Console, _team, browser  # noqa: F401 - `browser` is a fixture used by name

from local.harness import ADMIN_KEY

APPROVER, STRANGER = "U0APPROVER1", "U0STRANGER1"
TUNED = {"type": "string_check", "name": "tuned", "input": "{{sample.output_text}}", "reference": ":ft:",
         "operation": "like"}
ITEM_SCHEMA = {"type": "object", "required": ["messages", "reference_answer"],
               "properties": {"messages": {"type": "array"}, "reference_answer": {"type": "string"},
                              "id": {"type": "string"}}}


def _key(base: str, team_id: str, owner: str | None) -> str:
    status, key = http("POST", f"{base}/v1/admin/teams/{team_id}/keys", ADMIN_KEY, {"owner": owner} if owner else None)
    assert status == 201, key
    return key["key"]


def _run(world, run_id: str) -> dict:
    status, run = http("GET", f"{world['base']}/v1/pipelines/{world['pipeline']['id']}/runs/{run_id}", world["key"])
    assert status == 200, run
    return run


def _until(world, run_id: str, done, timeout: float = 180) -> dict:
    """Polls the run until done(run); reading its job drives the job on the test stack, as the
    reconciler would."""
    deadline = time.monotonic() + timeout
    while True:
        run = _run(world, run_id)
        if done(run):
            return run
        assert time.monotonic() < deadline, f"run stuck: {run}"
        if run["job_id"]:
            world["client"].fine_tuning.jobs.retrieve(run["job_id"])
        time.sleep(0.3)


@pytest.fixture(scope="module")
def world(stack):
    state = stack.bedrock_state
    saved = dict(state.clock)
    state.clock.update({"validating_seconds": 0.1, "queued_seconds": 0.1, "step_seconds": 0.1, "total_steps": 4})
    try:
        base = stack.base_url
        team_id, key = _team(base, "console-pipelines")                      # a key with no owner
        client = openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0)
        register_graders(client)
        data = client.files.create(file=("eval.jsonl", jsonl(arithmetic_rows(20, seed=5))), purpose="fine-tune")
        ev = client.evals.create(name="pipeline-eval", testing_criteria=[TUNED],
                                 data_source_config={"type": "custom", "item_schema": ITEM_SCHEMA})
        alias = f"console-calc-{int(time.time() * 1000) % 10**8}"
        spec = {"name": "console-weekly", "dataset": {"prefix": True},
                "job": {"model": "openai.gpt-oss-20b", "method": rft()},
                "eval": {"eval_id": ev.id, "criteria": {"tuned": 1.0}, "no_worse_than_current": True,
                         "data_source": {"source": {"type": "file_id", "id": data.id},
                                         "input_messages": {"type": "item_reference", "item_reference": "item.messages"},
                                         "sampling_params": {"max_completion_tokens": 16}}},
                "target_alias": alias,
                "approval": {"mode": "slack", "approvers": [APPROVER], "timeout_seconds": 3600},
                "triggers": {"schedule": "rate(7 days)", "new_data": False, "on_busy": "drop"}}
        status, pipeline = http("POST", f"{base}/v1/pipelines", key, spec)
        assert status == 201, pipeline
        status, up = http("POST", f"{base}/v1/pipelines/{pipeline['id']}/uploads", key, {"filename": "week.jsonl"})
        assert status == 201, up
        req = urllib.request.Request(up["url"], data=jsonl(arithmetic_rows(100, seed=7)), method="PUT",
                                     headers={"Content-Type": "application/jsonl"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            assert resp.status == 200
        status, run = http("POST", f"{base}/v1/pipelines/{pipeline['id']}/runs", key)
        assert status == 201, run
        world = {"base": base, "team_id": team_id, "key": key, "client": client, "pipeline": pipeline,
                 "alias": alias, "eval": ev, "approver_key": _key(base, team_id, APPROVER),
                 "stranger_key": _key(base, team_id, STRANGER)}
        world["run"] = _until(world, run["id"], lambda r: r["status"] != "running" or r["waiting_on"] == "approval")
        assert world["run"]["status"] == "awaiting_approval", world["run"]
        yield world
    finally:
        state.clock.clear()
        state.clock.update(saved)


def _open_run(c: Console, world) -> None:
    """From the signed-in console: Pipelines in the nav, the pipeline, its run (links, as a user goes)."""
    pid, rid = world["pipeline"]["id"], world["run"]["id"]
    c.page.click("#nav a[data-page=pipelines]")
    c.page.click(f"#pipelines-table a[href='pipelines/{pid}']")
    c.page.click(f"#runs-table a[href='pipelines/{pid}/runs/{rid}']")
    c.page.wait_for_selector("#steps-table")


def test_the_pipelines_page_lists_the_pipeline_its_runs_and_a_run_awaiting_approval(world, browser):  # noqa: F811
    pid, run = world["pipeline"]["id"], world["run"]
    c = Console(browser, world["base"], strict=True)
    c.sign_in(world["key"])
    c.page.click("#nav a[data-page=pipelines]")
    row = c.page.wait_for_selector(f"#pipelines-table tr[data-pipeline='{pid}']")
    text = row.inner_text()
    assert "console-weekly" in text and world["alias"] in text and "rate(7 days)" in text and "when busy: drop" in text
    assert row.query_selector(".badge.awaiting_approval") is not None, text                # the last run's status
    c.shot("pipelines")

    c.page.click(f"#pipelines-table a[href='pipelines/{pid}']")
    run_row = c.page.wait_for_selector(f"#runs-table tr[data-run='{run['id']}']")
    assert "awaiting_approval" in run_row.inner_text() and "manual" in run_row.inner_text()
    assert world["eval"].id in c.page.inner_text("#gate") and "tuned ≥ 1" in c.page.inner_text("#gate")

    c.page.click(f"#runs-table a[href='pipelines/{pid}/runs/{run['id']}']")
    c.page.wait_for_selector("#steps-table")
    steps = c.page.eval_on_selector_all("#steps-table tbody tr", "rows => rows.map(r => [r.dataset.step, "
                                        "r.querySelector('.badge').textContent])")
    assert steps == [[s["name"], s["status"]] for s in run["steps"]], steps
    assert [s[0] for s in steps][:5] == ["check_data", "preflight", "train", "evaluate", "gate"]
    assert c.page.get_attribute("#run a[href^='jobs/']", "href") == f"jobs/{run['job_id']}"
    candidate = c.page.inner_text("#comparison-table tr[data-criterion=tuned]")
    assert candidate.split("\t")[:2] == ["tuned", f"{run['comparison']['tuned']['score']:.4f}"], candidate
    assert run["candidate_model"] in c.page.inner_text("#comparison")
    assert APPROVER in c.page.inner_text("#approval")
    assert c.page.locator("#approve-run").is_enabled() and c.page.locator("#reject-run").is_enabled()
    assert c.page.locator("main h1 .badge.awaiting_approval").count() == 1
    c.shot("pipeline-run")
    c.close()


@pytest.mark.parametrize("who, refusal", [
    ("key", "Only a key whose owner is one of the pipeline's approvers"),        # a key with no owner
    ("stranger_key", "Only the pipeline's listed approvers may decide"),         # an owner not listed
])
def test_a_non_approvers_click_shows_the_apis_refusal_and_decides_nothing(world, browser, who, refusal):  # noqa: F811
    c = Console(browser, world["base"])
    c.sign_in(world[who])
    _open_run(c, world)
    c.page.click("#approve-run")
    shown = c.page.wait_for_selector("#decision-msg.error").inner_text()
    assert refusal in shown, shown
    assert c.page.locator("#approve-run").is_enabled()                          # still there to try again
    run = _run(world, world["run"]["id"])
    assert run["status"] == "awaiting_approval" and run["approval"] is None, run
    c.close()


def test_an_approvers_click_moves_the_run_on_and_the_page_says_who_approved(world, browser):  # noqa: F811
    rid = world["run"]["id"]
    c = Console(browser, world["base"], strict=True)
    c.sign_in(world["approver_key"])
    _open_run(c, world)
    c.page.click("#approve-run")
    decided = c.page.wait_for_selector("#approval .badge.approved")            # the page, re-read after the POST
    approval = c.page.inner_text("#approval")
    assert APPROVER in approval and "console" in approval, approval
    assert decided is not None and c.page.locator("#approve-run").count() == 0
    assert f"Approved by {APPROVER}" in c.page.inner_text("#status")
    run = _run(world, rid)
    assert run["approval"]["by"] == APPROVER and run["approval"]["via"] == "console", run
    run = _until(world, rid, lambda r: r["status"] != "awaiting_approval" and r["status"] != "running")
    assert run["status"] == "succeeded" and run["steps"][-1]["name"] == "promote", run
    _open_run(c, world)                                                        # the run as it ended
    c.page.wait_for_selector("main h1 .badge.succeeded")
    assert c.page.locator("#steps-table tr[data-step=promote] .badge.succeeded").count() == 1
    assert f"{world['alias']} v{run['alias_version']}" in c.page.inner_text("#run")
    c.shot("pipeline-run-approved")

    # Start a run from the pipeline's page: the page opens it; the API names this key as who started it.
    c.page.click(f"main a[href='pipelines/{world['pipeline']['id']}']")
    c.page.click("#start-run")
    c.page.wait_for_function("rid => location.pathname.includes('/runs/') && !location.pathname.endsWith('/' + rid) "
                             "&& document.querySelector('#page-title .badge') !== null", arg=rid)
    started = c.page.url.rsplit("/", 1)[1]
    assert started != rid and started.startswith("prun-"), c.page.url
    again = _run(world, started)
    assert again["trigger"]["kind"] == "manual" and again["trigger"]["by"] == f"key:{world['approver_key'].split('_')[1]}"
    c.close()


def test_a_run_page_fits_a_phone_screen(world, browser):  # noqa: F811
    c = Console(browser, world["base"], viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    c.sign_in(world["key"])
    _open_run(c, world)
    c.page.wait_for_selector("#comparison-table")
    assert c.page.evaluate("document.documentElement.scrollWidth <= window.innerWidth + 1")
    c.shot("pipeline-run-phone")
    c.close()


def test_an_approvers_reject_ends_the_run_and_leaves_the_alias_where_it_was(world, browser):  # noqa: F811
    """A second run on new data, compared with the model the first run put in production."""
    base, pid = world["base"], world["pipeline"]["id"]
    status, up = http("POST", f"{base}/v1/pipelines/{pid}/uploads", world["key"], {"filename": "week2.jsonl"})
    assert status == 201, up
    req = urllib.request.Request(up["url"], data=jsonl(arithmetic_rows(100, seed=8)), method="PUT",
                                 headers={"Content-Type": "application/jsonl"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        assert resp.status == 200
    status, run = http("POST", f"{base}/v1/pipelines/{pid}/runs", world["key"])
    assert status == 201, run
    run = _until(world, run["id"], lambda r: r["status"] != "running" or r["waiting_on"] == "approval")
    assert run["status"] == "awaiting_approval" and run["current_model"], run
    _, before = http("GET", f"{base}/v1/models/aliases/{world['alias']}/history", world["key"])

    c = Console(browser, base, strict=True)
    c.sign_in(world["approver_key"])
    _open_run(c, {**world, "run": run})
    row = c.page.inner_text("#comparison-table tr[data-criterion=tuned]").split("\t")
    score = run["comparison"]["tuned"]
    assert row[1:4] == [f"{score['score']:.4f}", f"{score['current_score']:.4f}", f"{score['delta']:.4f}"], row
    assert run["current_model"] in c.page.inner_text("#comparison")
    c.page.click("#reject-run")
    c.page.wait_for_selector("#approval .badge.rejected")
    assert f"Rejected by {APPROVER}" in c.page.inner_text("#status")
    ended = _until(world, run["id"], lambda r: r["status"] not in ("awaiting_approval", "running"))
    assert ended["status"] == "rejected" and ended["approval"]["decision"] == "reject", ended
    _, after = http("GET", f"{base}/v1/models/aliases/{world['alias']}/history", world["key"])
    assert after == before                                                     # the alias did not move
    _open_run(c, {**world, "run": run})
    c.page.wait_for_selector("main h1 .badge.rejected")
    assert f"rejected by {APPROVER}" in c.page.inner_text("#run-error")
    c.close()


def test_the_pipeline_pages_open_from_a_typed_url(world):
    base, pid, rid = world["base"], world["pipeline"]["id"], world["run"]["id"]
    shell = httpx.get(f"{base}/console", timeout=30).text
    for path in ("/console/pipelines", f"/console/pipelines/{pid}", f"/console/pipelines/{pid}/runs/{rid}"):
        assert httpx.get(f"{base}{path}", timeout=30).text == shell, path
