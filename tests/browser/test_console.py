"""The console (issue #18): rft-hub's own pages under /console, signed in with a session cookie,
tested over HTTP and in a real browser.

The browser is Debian's Chromium (`apt-get install -y chromium`; `make test` installs it when
missing), driven by Playwright for Python with `executable_path` -- never `playwright install`.
Without Chromium these tests fail with a message saying so; `RFT_SKIP_BROWSER=1` skips the
browser tests explicitly. Screenshots of each page go to test-artifacts/console/ (gitignored);
`RFT_UPDATE_DOCS_SCREENSHOT=1` also refreshes docs/console-job.png, docs/console.md's picture.
"""
import json
import os
import time
from pathlib import Path

import httpx
import openai
import pytest
from helpers import http, start_job, wait_for, wait_run
from sample_data import arithmetic_rows

from chalicelib.platform import console_sessions
from local.harness import ADMIN_KEY

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts" / "console"
CHROMIUM = os.environ.get("RFT_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]
COOKIE = console_sessions.COOKIE
CSV_HEADER = "team_id,day,requests,errors,input_tokens,cached_tokens,output_tokens,cost_micro,cost_usd"


# ---- the world the console shows: two teams, a trained job, an eval with two runs, spend ---------

def _team(base: str, name: str) -> tuple[str, str]:
    status, team = http("POST", f"{base}/v1/admin/teams", ADMIN_KEY, {"name": name})
    assert status == 201, team
    status, key = http("POST", f"{base}/v1/admin/teams/{team['id']}/keys", ADMIN_KEY)
    assert status == 201, key
    return team["id"], key["key"]


@pytest.fixture(scope="module")
def world(stack):
    state = stack.bedrock_state
    saved = dict(state.clock)
    state.clock.update({"validating_seconds": 0.1, "queued_seconds": 0.1, "step_seconds": 0.15, "total_steps": 6})
    try:
        base = stack.base_url
        team_a, key_a = _team(base, "console-a")
        team_b, key_b = _team(base, "console-b")
        client = openai.OpenAI(base_url=f"{base}/v1", api_key=key_a, max_retries=0)
        alias = f"console-bot-{int(time.time() * 1000) % 10**8}"
        job = wait_for(client, start_job(client, suffix=alias).id, {"succeeded", "failed"}, timeout=90)
        assert job.status == "succeeded", job.error
        status, answer = http("PUT", f"{base}/v1/admin/teams/{team_a}/budget", ADMIN_KEY,
                              {"limit_usd": "25", "alert_thresholds": [0.5, 0.9]})
        assert status == 200, answer
        for i in range(3):
            client.chat.completions.create(model=alias, messages=[{"role": "user", "content": f"hello {i}"}],
                                           max_completion_tokens=16)
        steps = {c["step"]: c["model"] for c in client.models.retrieve(job.fine_tuned_model).model_extra["rft_checkpoints"]}
        early, last = steps[min(steps)], steps[max(steps)]
        criterion = f"ckpt-step-{max(steps)}"
        ev = client.evals.create(
            name="console gate", data_source_config={"type": "custom", "item_schema": {
                "type": "object", "properties": {"id": {"type": "string"}, "messages": {"type": "array"},
                                                 "reference_answer": {"type": "string"}}}},
            testing_criteria=[{"type": "string_check", "name": "last-checkpoint", "input": "{{sample.output_text}}",
                               "reference": criterion, "operation": "like"}])
        # A gate pins the data, input messages and sampling of the runs that count (issue #23 M2).
        pin = {"source": {"type": "file_content", "content": [{"item": r} for r in arithmetic_rows(20, seed=5)]},
               "input_messages": {"type": "template", "template": [
                   {"type": "message", "role": "user", "content": {"type": "input_text", "text": "Q: {{item.id}}"}}]},
               "sampling_params": {"max_completion_tokens": 16}}
        status, answer = http("POST", f"{base}/v1/models/aliases", key_a, {
            "alias": alias, "model": job.fine_tuned_model,
            "gate": {"eval_id": ev.id, "criteria": {"last-checkpoint": 1.0}, "data_source": pin}})
        assert status == 200, answer
        runs = {}
        for model in (early, last):
            source = {"type": "completions", "model": model, **pin}
            runs[model] = wait_run(client, ev.id, client.evals.runs.create(ev.id, data_source=source).id)
            assert runs[model].status == "completed", runs[model]
        yield {"base": base, "team_a": team_a, "key_a": key_a, "team_b": team_b, "key_b": key_b, "client": client,
               "job": job, "alias": alias, "early": early, "last": last, "eval": ev, "runs": runs}
    finally:
        state.clock.clear()
        state.clock.update(saved)


def _sign_in_http(base: str, key: str) -> httpx.Response:
    return httpx.post(f"{base}/console/session", json={"key": key}, timeout=30)


def _cookie_of(response: httpx.Response) -> str:
    header = response.headers["set-cookie"]
    assert header.startswith(f"{COOKIE}="), header
    return header.split(";", 1)[0].split("=", 1)[1]


def _get(base: str, path: str, token: str | None, **headers) -> httpx.Response:
    cookies = {"Cookie": f"{COOKIE}={token}"} if token else {}
    return httpx.get(f"{base}{path}", headers={**cookies, **headers}, timeout=30)


def _send(method: str, base: str, path: str, token: str, body=None, **headers) -> httpx.Response:
    return httpx.request(method, f"{base}{path}", headers={"Cookie": f"{COOKIE}={token}", **headers},
                         json=body, timeout=30)


# ---- the session, over HTTP -----------------------------------------------------------------------

def test_sign_in_exchanges_a_key_for_a_signed_short_lived_cookie(world):
    base, key = world["base"], world["key_a"]
    r = _sign_in_http(base, key)
    assert r.status_code == 200, r.text
    attributes = [a.strip().lower() for a in r.headers["set-cookie"].split(";")[1:]]
    assert {"httponly", "secure", "samesite=strict", "path=/"} <= set(attributes)
    max_age = int(next(a for a in attributes if a.startswith("max-age=")).split("=")[1])
    assert 0 < max_age <= 24 * 3600
    body = r.json()
    assert body["principal"] == "team" and body["team_id"] == world["team_a"] and body["csrf_token"]
    assert body["key_id"] == key.split("_")[1]
    token = _cookie_of(r)
    assert key not in token and key.split("_", 2)[2] not in token and key not in r.text   # the key is not handed back
    # The cookie alone authenticates the API (reads), as its team only.
    me = _get(base, "/v1/me", token)
    assert me.status_code == 200 and me.json()["team"]["id"] == world["team_a"]
    assert _get(base, f"/v1/fine_tuning/jobs/{world['job'].id}", token).json()["id"] == world["job"].id
    session = _get(base, "/console/session", token).json()
    assert session["csrf_token"] == body["csrf_token"] and session["expires_at"] == body["expires_at"]
    assert _get(base, "/v1/admin/teams", token).status_code == 401          # a team session is not the admin
    # Refused: a wrong key, a forged or altered token, an expired one.
    assert _sign_in_http(base, key[:-2] + "xx").status_code == 401
    assert _sign_in_http(base, "not-a-key").status_code == 401
    as_form = httpx.post(f"{base}/console/session", content=json.dumps({"key": key}), timeout=30,
                         headers={"Content-Type": "text/plain"})                # a cross-site form's only way
    assert as_form.status_code == 415 and "set-cookie" not in as_form.headers
    version, payload, signature = token.split(".")
    forged = json.loads(console_sessions._unb64(payload))
    forged["team"] = world["team_b"]
    forged_token = f"{version}.{console_sessions._b64(json.dumps(forged).encode())}.{signature}"
    for bad in (forged_token, token[:-3] + "AAA", "v1.e30.AAAA"):
        r = _get(base, "/v1/me", bad)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", r.text
    stale, _ = console_sessions.issue(console_sessions.Principal(world["team_a"], key.split("_")[1]),
                                      now=int(time.time()) - console_sessions.session_seconds() - 5)
    assert _get(base, "/v1/me", stale).status_code == 401
    # A bearer key still works beside it and takes precedence.
    r = _get(base, "/v1/me", token, Authorization=f"Bearer {world['key_b']}")
    assert r.json()["team"]["id"] == world["team_b"]


def test_writes_by_cookie_need_the_csrf_token_and_sign_out_ends_the_session(world):
    base = world["base"]
    signed = _sign_in_http(base, world["key_a"])
    token, csrf = _cookie_of(signed), signed.json()["csrf_token"]
    body = {"alias": world["alias"], "model": world["job"].fine_tuned_model}     # an idempotent re-point
    r = _send("POST", base, "/v1/models/aliases", token, body)
    assert r.status_code == 403 and r.json()["error"]["code"] == "csrf_token_invalid", r.text
    r = _send("POST", base, "/v1/models/aliases", token, body, **{"X-CSRF-Token": "A" * len(csrf)})
    assert r.status_code == 403
    other = _cookie_of(_sign_in_http(base, world["key_a"]))                     # another session's token
    r = _send("POST", base, "/v1/models/aliases", other, body, **{"X-CSRF-Token": csrf})
    assert r.status_code == 403
    r = _send("POST", base, "/v1/models/aliases", token, body, **{"X-CSRF-Token": csrf})
    assert r.status_code == 200 and r.json()["id"] == world["alias"], r.text
    # The streamed data plane applies the same rule (it shares api/http.py's authentication).
    chat = {"model": world["alias"], "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 8}
    r = _send("POST", base, "/v1/chat/completions", token, chat)
    assert r.status_code == 403 and r.json()["error"]["code"] == "csrf_token_invalid", r.text
    r = _send("POST", base, "/v1/chat/completions", token, chat, **{"X-CSRF-Token": csrf})
    assert r.status_code == 200 and r.json()["object"] == "chat.completion", r.text
    # Sign-out needs the token too, revokes the session server-side and clears the cookie.
    assert _send("DELETE", base, "/console/session", token).status_code == 403
    r = _send("DELETE", base, "/console/session", token, **{"X-CSRF-Token": csrf})
    assert r.status_code == 200 and r.json()["deleted"] is True
    assert "max-age=0" in r.headers["set-cookie"].lower()
    assert _get(base, "/v1/me", token).status_code == 401                     # the old cookie, replayed
    assert _get(base, "/v1/me", other).status_code == 200                     # other sessions live on
    # Revoking the key ends its sessions at the next auth-cache expiry (cleared here, as 30 s would).
    _, spare_key = _team(base, "console-revoked")
    spare = _cookie_of(_sign_in_http(base, spare_key))
    assert _get(base, "/v1/me", spare).status_code == 200
    status, _ = http("DELETE", f"{base}/v1/admin/keys/{spare_key.split('_')[1]}", ADMIN_KEY)
    assert status == 200
    console_sessions.clear_cache()
    assert _get(base, "/v1/me", spare).status_code == 401
    # An admin session: admin routes and every team's usage; team routes need a team key.
    admin = _sign_in_http(base, ADMIN_KEY)
    assert admin.status_code == 200 and admin.json()["principal"] == "admin"
    admin_token = _cookie_of(admin)
    assert _get(base, "/v1/admin/teams", admin_token).status_code == 200
    assert _get(base, "/v1/usage?group_by=model", admin_token).status_code == 200
    assert _get(base, "/v1/fine_tuning/jobs", admin_token).status_code == 401


def test_the_console_is_static_small_and_listed(world):
    base = world["base"]
    shell = httpx.get(f"{base}/console", timeout=30)
    assert shell.status_code == 200 and shell.headers["content-type"].startswith("text/html")
    csp = shell.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp and "connect-src 'self'" in csp
    assert '<base href="/console/">' in shell.text and "http" not in shell.text.split("<body>")[0].replace(
        "http://www.w3.org", "")                                               # nothing fetched from elsewhere
    total = len(shell.content)
    for name, kind in (("console.css", "text/css"), ("console.js", "text/javascript"), ("chart.js", "text/javascript"),
                       ("pipelines.js", "text/javascript")):
        asset = httpx.get(f"{base}/console/static/{name}", timeout=30)
        assert asset.status_code == 200 and asset.headers["content-type"].startswith(kind), name
        assert f"static/{name}?v=" in shell.text
        total += len(asset.content)
    assert total < 300_000, f"the first page is {total} bytes"
    for path in ("/console/static/app.py", "/console/static/..%2F..%2Fapp.py", "/console/nope"):
        r = httpx.get(f"{base}{path}", timeout=30)
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found" and "app.py" not in r.text
    for path in (f"/console/jobs/{world['job'].id}", "/console/spend",
                 f"/console/evals/{world['eval'].id}/runs/{world['runs'][world['last']].id}"):
        assert httpx.get(f"{base}{path}", timeout=30).text == shell.text, path
    doc = httpx.get(f"{base}/openapi.json", timeout=30).json()
    for path in ("/console", "/console/{page}", "/console/jobs/{job_id}", "/console/static/{asset}",
                 "/console/evals/{eval_id}/runs/{run_id}"):
        assert "get" in doc["paths"][path], path
    assert set(doc["paths"]["/console/session"]) == {"get", "post", "delete"}


# ---- in a real browser ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def browser():
    if os.environ.get("RFT_SKIP_BROWSER") == "1":
        pytest.skip("RFT_SKIP_BROWSER=1: browser tests skipped on request")
    if not Path(CHROMIUM).exists():
        pytest.fail(f"Chromium is not installed at {CHROMIUM}: the console's browser tests need Debian's chromium "
                    "package (`make test` installs it: apt-get install -y chromium). Set RFT_SKIP_BROWSER=1 to skip "
                    "them explicitly.", pytrace=False)
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("Playwright for Python is missing: pip install -r requirements-dev.txt", pytrace=False)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        launched = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


class Console:
    """One browser context (its own cookies) on the console, failing on any page error."""

    def __init__(self, browser, base: str, strict: bool = False, **context):
        """strict: every message the page logs at error level fails the test (a failed request, an
        invalid `pattern`, ...), not only CSP violations and invalid patterns."""
        self.base = base
        self.context = browser.new_context(viewport=context.pop("viewport", {"width": 1280, "height": 900}),
                                           accept_downloads=True, **context)
        self.page = self.context.new_page()
        # Waits for a page to be ready, not timings: generous, since `make test` runs two stacks on two cores
        # and the admin's pages read every team of the session.
        self.page.set_default_timeout(60_000)
        self.errors: list[str] = []
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("console", lambda m: self.errors.append(m.text) if (
            "Content Security Policy" in m.text or "regular expression" in m.text
            or (strict and m.type in ("error", "warning"))) else None)

    def sign_in(self, key: str, path: str = "/console"):
        self.page.goto(self.base + path)
        self.page.fill("#key", key)
        self.page.click("form.signin button[type=submit]")
        self.page.wait_for_selector("#who:not([hidden])")
        return self

    def open(self, path: str, selector: str):
        self.page.goto(self.base + path)
        self.page.wait_for_selector(selector)

    def shot(self, name: str, **kw):
        self.page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=kw.pop("full_page", True), **kw)

    def close(self):
        self.context.close()
        assert not self.errors, self.errors


def test_a_team_sees_its_jobs_curve_rollouts_models_evals_and_spend(world, browser):
    base, job, client = world["base"], world["job"], world["client"]
    c = Console(browser, base)
    page = c.page
    c.sign_in(world["key_a"])
    # Signed in, the key is nowhere in the browser: only the HttpOnly cookie.
    cookie = next(k for k in c.context.cookies() if k["name"] == COOKIE)
    assert cookie["httpOnly"] and cookie["secure"] and cookie["sameSite"] == "Strict"
    stored = page.evaluate("JSON.stringify([document.cookie, Object.entries(localStorage), Object.entries(sessionStorage)])")
    assert world["key_a"].split("_", 2)[2] not in stored and COOKIE not in stored

    # Jobs: the team's job with its status, model, grader, best reward and costs.
    row = page.wait_for_selector(f"#jobs-table tr[data-job='{job.id}']")
    page.wait_for_function(f"!document.querySelector(\"tr[data-job='{job.id}']\").textContent.includes('…')")
    text = row.inner_text()
    assert "succeeded" in text and "openai.gpt-oss-20b" in text and "lambda" in text and world["alias"] in text
    best = client.models.retrieve(job.fine_tuned_model).model_extra["rft_best_reward"]
    assert f"{best:.3f}" in text and text.count("$") == 2
    page.select_option("#f-status", "failed")
    assert page.locator("#jobs-table tbody tr").count() == 0
    page.select_option("#f-status", "")
    page.select_option("#f-model", "openai.gpt-oss-20b")
    assert page.locator("#jobs-table tbody tr").count() == 1 and "model=openai.gpt-oss-20b" in page.url
    c.shot("jobs")

    # The job: its reward curve drawn from the metrics events, point for point.
    page.click(f"#jobs-table a[href='jobs/{job.id}']")
    page.wait_for_selector("#reward-chart svg circle.pt")
    events = client.fine_tuning.jobs.list_events(job.id, limit=100).data
    metrics = {e.data["step"]: e.data for e in events if e.type == "metrics"}
    assert len(metrics) == 6
    for series, field in (("reward", "critic_rewards_mean"), ("length", "response_length_mean"), ("entropy", "actor_entropy")):
        drawn = page.eval_on_selector_all(f"#reward-chart circle.pt[data-series={series}]",
                                          "els => els.map(e => [Number(e.dataset.step), Number(e.dataset.value)])")
        assert sorted(map(tuple, drawn)) == sorted((s, d[field]) for s, d in metrics.items()), series
    assert page.locator("#reward-data tbody tr").count() == len(metrics)             # the accessible table
    page.hover("#reward-chart svg", position={"x": 300, "y": 60})
    tip = page.wait_for_selector("#reward-chart .tip:not([hidden])")
    assert "reward:" in tip.inner_text() and "entropy:" in tip.inner_text()
    page.focus("#reward-chart")
    page.keyboard.press("End")
    assert page.get_attribute("#reward-chart", "data-hover-step") == str(max(metrics))
    status_path = page.inner_text("#timeline .path")
    assert [s.strip() for s in status_path.split("\n") if s.strip()] == job.model_extra["rft_status_path"]
    assert "succeeded" in page.inner_text("#timeline .timeline")
    assert page.locator("#checkpoints tbody tr").count() == len(client.fine_tuning.jobs.checkpoints.list(job.id).data)
    assert "passed" in page.inner_text("#preflight")
    cost = page.inner_text("#cost")
    assert f"${float(job.model_extra['rft_cost_estimate']['estimated_usd']):.4f}" in cost and "Settled" in cost
    assert page.locator("#cancel-job").count() == 0                                   # nothing to cancel

    # Rollouts: best of the latest window, then the worst, with their full text.
    page.wait_for_selector("#rollout-list details.rollout")
    rewards = [float(r) for r in page.eval_on_selector_all("#rollout-list details.rollout", "els => els.map(e => e.dataset.reward)")]
    assert rewards and rewards == sorted(rewards, reverse=True)
    c.shot("job")
    if os.environ.get("RFT_UPDATE_DOCS_SCREENSHOT") == "1":                      # docs/console.md's picture
        page.set_viewport_size({"width": 1100, "height": 760})
        page.evaluate("document.activeElement.blur(); window.scrollTo(0, 0)")
        page.wait_for_timeout(300)
        page.hover("#reward-chart circle.pt[data-series=reward][data-step='4']")
        page.wait_for_selector("#reward-chart .tip:not([hidden])")
        page.screenshot(path=str(ROOT / "docs" / "console-job.png"))
        page.set_viewport_size({"width": 1280, "height": 900})
    page.click("#rollouts button[data-order=reward_asc]")
    page.wait_for_function("document.querySelector('#rollouts button[data-order=reward_asc]').getAttribute('aria-pressed') === 'true'")
    page.wait_for_selector("#rollout-list details.rollout")
    status, worst = http("GET", f"{base}/v1/fine_tuning/jobs/{job.id}/rollouts?order=reward_asc&limit=10", world["key_a"])
    assert status == 200 and worst["data"]
    page.wait_for_function(f"document.querySelector('#rollout-list details.rollout').dataset.rollout === '{worst['data'][0]['id']}'")
    first = page.locator("#rollout-list details.rollout").first
    first.locator("summary").click()
    assert first.locator("pre.response").inner_text() == worst["data"][0]["response"]
    assert worst["data"][0]["prompt"] in first.inner_text()

    # Models: promotion through the alias's gate, refused then allowed, and the history's evidence.
    page.click("#nav a[data-page=models]")
    page.wait_for_selector("#promote-form")
    page.fill("#alias-name", world["alias"])
    page.select_option("#alias-model", world["early"])
    page.click("#promote-form button[type=submit]")
    page.wait_for_selector("#alias-msg.error")
    assert "gate" in page.inner_text("#alias-msg") and world["runs"][world["early"]].id in page.inner_text("#alias-msg")
    page.select_option("#alias-model", world["last"])
    page.click("#promote-form button[type=submit]")
    page.wait_for_selector("#alias-msg.ok")
    message = page.inner_text("#alias-msg")
    assert world["last"] in message and world["runs"][world["last"]].id in message
    assert client.models.retrieve(world["alias"]).model_extra["rft_target"] == world["last"]
    page.click(f"tr[data-alias='{world['alias']}'] button")
    history = page.wait_for_selector(f"#history-{world['alias']} table")
    assert world["runs"][world["last"]].id in history.inner_text() and "key:" in history.inner_text()
    c.shot("models")
    page.once("dialog", lambda d: d.accept())                      # roll back: the gate applies to it too
    page.click(f"#history-{world['alias']} button[data-rollback]")
    page.wait_for_selector("#alias-msg.error")
    assert "gate" in page.inner_text("#alias-msg")

    # Evals: the two runs compared, with the items where they differ.
    page.click("#nav a[data-page=evals]")
    page.click(f"a[href='evals/{world['eval'].id}']")
    page.wait_for_selector("#runs-table")
    for model in (world["early"], world["last"]):
        page.check(f"#runs-table tr[data-run='{world['runs'][model].id}'] input[type=checkbox]")
    page.click("#compare-runs")
    page.wait_for_selector("#comparison-card")
    _, compared = http("GET", f"{base}/v1/evals/{world['eval'].id}/compare?limit=50&runs="
                       f"{world['runs'][world['early']].id},{world['runs'][world['last']].id}", world["key_a"])
    assert compared["items"] and page.locator("#diff-items tbody tr").count() == len(compared["items"])
    c.shot("evals")
    page.click(f"#runs-table a[href='evals/{world['eval'].id}/runs/{world['runs'][world['last']].id}']")
    page.wait_for_selector("details.rollout")
    assert "20 passed" in page.inner_text("main")        # the gate's pinned 20 rows

    # Spend: by day, model and key, the budget, and the CSV.
    page.click("#nav a[data-page=spend]")
    page.wait_for_selector("#budget")
    budget = page.inner_text("#budget")
    assert "$25.00" in budget and "50%, 90%" in budget
    assert world["alias"] in page.inner_text("#by-model") and world["key_a"].split("_")[1] in page.inner_text("#by-key")
    assert page.locator("#spend-chart rect").count() >= 1
    with page.expect_download() as download:
        page.click("a.csv[data-group=day]")
    csv_text = Path(download.value.path()).read_text()
    assert csv_text.splitlines()[0] == CSV_HEADER and world["team_a"] in csv_text and world["team_b"] not in csv_text
    c.shot("spend")

    # Sign out: the session ends on the server, the cookie is gone.
    token = cookie["value"]
    page.click("#sign-out")
    page.wait_for_selector("form.signin")
    assert not [k for k in c.context.cookies() if k["name"] == COOKIE]
    assert _get(base, "/v1/me", token).status_code == 401
    c.close()


def test_a_running_job_is_cancelled_from_its_page(world, browser, stack):
    state = stack.bedrock_state
    step_seconds = state.clock["step_seconds"]
    state.clock["step_seconds"] = 30                     # long enough to be cancelled while it runs
    try:
        job = start_job(world["client"], rows=100)
        c = Console(browser, world["base"])
        c.sign_in(world["key_a"], f"/console/jobs/{job.id}")
        c.page.wait_for_selector("#cancel-job")
        c.page.once("dialog", lambda d: d.accept())
        c.page.click("#cancel-job")
        c.page.wait_for_selector("main h1 .badge.cancelled")
        assert c.page.locator("#cancel-job").count() == 0
        assert world["client"].fine_tuning.jobs.retrieve(job.id).status == "cancelled"
        c.close()
    finally:
        state.clock["step_seconds"] = step_seconds


def test_a_phone_sized_screen_gets_the_same_pages_without_sideways_scrolling(world, browser):
    c = Console(browser, world["base"], viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    c.sign_in(world["key_a"], f"/console/jobs/{world['job'].id}")
    c.page.wait_for_selector("#reward-chart svg circle.pt")
    c.page.wait_for_selector("#rollout-list details.rollout")
    assert c.page.evaluate("document.documentElement.scrollWidth <= window.innerWidth + 1")
    c.page.tap("#reward-chart svg")
    c.page.wait_for_selector("#reward-chart .tip:not([hidden])")
    c.shot("job-phone")
    c.close()


def test_a_second_team_cannot_open_the_first_teams_job(world, browser):
    c = Console(browser, world["base"])
    c.sign_in(world["key_b"], f"/console/jobs/{world['job'].id}")
    error = c.page.wait_for_selector("main .msg.error")
    assert "job" in error.inner_text().lower()
    assert c.page.locator("#reward-chart").count() == 0 and world["alias"] not in c.page.inner_text("main")
    status = c.page.evaluate(f"fetch('../v1/fine_tuning/jobs/{world['job'].id}').then(r => r.status)")
    assert status == 404
    c.page.click("#nav a[data-page=jobs]")
    c.page.wait_for_selector("main h1:has-text('Jobs')")
    assert world["job"].id not in c.page.inner_text("main")
    c.shot("other-team")
    c.close()


def test_the_admin_sees_every_team_side_by_side(world, browser):
    c = Console(browser, world["base"])
    c.sign_in(ADMIN_KEY)
    c.page.wait_for_selector("#by-model")                       # the admin lands on every team's spend
    assert world["team_a"] in c.page.inner_text("#by-model")
    c.page.click("#nav a[data-page=admin]")
    c.page.wait_for_selector("#teams-table")
    row_a = c.page.inner_text(f"#teams-table tr[data-team='{world['team_a']}']")
    assert "console-a" in row_a and "$25.00" in row_a
    assert c.page.locator(f"#teams-table tr[data-team='{world['team_b']}']").count() == 1
    assert c.page.locator("#prices tbody tr").count() >= 3
    audit = c.page.inner_text("#audit")                         # the audit log (issue #29): the newest acts
    assert "key.created" in audit and "console.signed_in" in audit
    c.shot("admin")
    c.page.click("#nav a[data-page=jobs]")
    assert "admin key has no team" in c.page.inner_text("main")
    c.close()


# ---- issue #23: the signed-out probe, the alias pattern, spend totals, chart ranges ---------------

def _usd(value) -> str:
    """The console's usd() (console.js), for comparing what a page shows."""
    n = float(value)
    if n == 0:
        return "$0.00"
    return "$" + (f"{n:.6f}" if 0 < n < 0.01 else f"{n:.4f}" if n < 10 else f"{n:.2f}")


def test_the_signed_out_page_logs_no_console_error_and_the_probe_says_signed_out(world, browser):
    base = world["base"]
    c = Console(browser, base, strict=True)
    c.page.goto(base + "/console")
    c.page.wait_for_selector("form.signin")
    c.page.goto(base + f"/console/jobs/{world['job'].id}")       # a deep link, signed out
    c.page.wait_for_selector("form.signin")
    c.close()                                                    # asserts: nothing logged at error level
    signed_out = {"object": "console.session", "signed_in": False, "principal": None, "team_id": None,
                  "key_id": None, "expires_at": None, "csrf_token": None}
    for token in (None, "v1.e30.AAAA", "garbage"):               # none, a forged and a malformed cookie
        r = _get(base, "/console/session", token)
        assert r.status_code == 200 and r.json() == signed_out, r.text
    token = _cookie_of(_sign_in_http(base, world["key_a"]))
    assert _get(base, "/console/session", token).json()["signed_in"] is True
    r = _get(base, "/console/session", None, Authorization=f"Bearer {world['key_b']}")
    assert r.status_code == 200 and r.json()["signed_in"] is True and r.json()["team_id"] == world["team_b"]
    assert _get(base, "/console/session", None, Authorization="Bearer rfth_nope_nope").status_code == 401


def test_the_alias_pattern_compiles_as_browsers_compile_it_and_validates(world, browser):
    from chalicelib.inference.registry import ALIAS_RE

    c = Console(browser, world["base"], strict=True)
    c.sign_in(world["key_a"], "/console/models")
    c.page.wait_for_selector("#promote-form")
    patterns = c.page.eval_on_selector_all("input[pattern]", "els => els.map(e => e.getAttribute('pattern'))")
    assert patterns
    for pattern in patterns:         # the v flag: what Chromium compiles a pattern attribute with
        assert c.page.evaluate("p => { try { new RegExp('^(?:' + p + ')$', 'v'); return true; } "
                               "catch (e) { return String(e); } }", pattern) is True, pattern
    names = ["console-bot", "a", "x" * 64, "x" * 65, "Bad", "bad name", "-lead", "trail-", "émoji", "a_b", "9-9"]
    for name in names:
        c.page.fill("#alias-name", name)
        mismatch = c.page.eval_on_selector("#alias-name", "e => e.validity.patternMismatch")
        assert mismatch == (ALIAS_RE.match(name) is None), name      # the browser refuses what the API refuses
    c.page.fill("#alias-name", "Bad Name")
    c.page.click("#promote-form button[type=submit]")             # the browser's own validation stops it
    assert c.page.eval_on_selector("#alias-name", "e => e.matches(':invalid')")
    assert c.page.inner_text("#alias-msg") == ""
    c.close()


def test_spend_shows_inference_grader_training_and_total_budget_or_not(world, browser):
    base = world["base"]
    other = openai.OpenAI(base_url=f"{base}/v1", api_key=world["key_b"], max_retries=0)
    for i in range(2):                                            # team B: real costs, no budget
        other.chat.completions.create(model="openai.gpt-oss-20b", messages=[{"role": "user", "content": f"hi {i}"}],
                                      max_completion_tokens=16)
    month = time.strftime("%Y-%m-01", time.gmtime())
    status, usage_b = http("GET", f"{base}/v1/usage?group_by=kind&start={month}", world["key_b"])
    assert status == 200 and usage_b["budget"]["limit_usd"] is None
    totals = usage_b["spend_totals"]
    assert float(totals["inference_usd"]) > 0 and float(usage_b["budget"]["spent_usd"]) == 0
    from decimal import Decimal

    assert Decimal(totals["total_usd"]) == sum(Decimal(totals[k]) for k in (
        "inference_usd", "grader_usd", "other_calls_usd", "training_usd"))
    status, usage_all = http("GET", f"{base}/v1/usage?group_by=kind&start={month}", ADMIN_KEY)
    team_a = usage_all["spend_by_team"][world["team_a"]]
    assert Decimal(team_a["training_usd"]) > 0 and usage_all["spend_by_team"][world["team_b"]] == totals

    c = Console(browser, base)
    c.sign_in(world["key_b"], "/console/spend")
    budget = c.page.wait_for_selector("#budget").inner_text()
    assert "no budget set" in budget and "Spent $0.00" not in budget.replace("\n", " ").replace("\t", " ")
    for label, key in (("inference", "inference_usd"), ("grader (judges)", "grader_usd"), ("training", "training_usd"),
                       ("total", "total_usd")):
        assert f"Spent this month: {label}\n{_usd(totals[key])}" in budget or \
            f"Spent this month: {label}\t{_usd(totals[key])}" in budget, (label, budget)
    c.close()

    c = Console(browser, base)
    c.sign_in(ADMIN_KEY, "/console/admin")
    c.page.wait_for_selector("#teams-table")
    for team in ("team_a", "team_b"):
        spent = c.page.inner_text(f"#teams-table tr[data-team='{world[team]}'] td.spent")
        assert spent == _usd(usage_all["spend_by_team"][world[team]]["total_usd"]) and spent != "$0.00", (team, spent)
    overall = c.page.inner_text("#admin-totals")
    for label in ("inference", "grader (judges)", "training", "total"):
        assert f"Spent: {label}" in overall
    assert _usd(usage_all["spend_totals"]["total_usd"]) in overall
    c.close()


def test_each_chart_panel_keeps_a_minimum_range_and_names_its_units(world, browser):
    c = Console(browser, world["base"], strict=True)
    c.sign_in(world["key_a"], f"/console/jobs/{world['job'].id}")
    c.page.wait_for_selector("#reward-chart svg circle.pt")
    labels = c.page.eval_on_selector_all("#reward-chart g.panel > text.lbl", "els => els.map(e => e.textContent)")
    assert labels == ["reward (mean grader score)", "response length (tokens)", "entropy (per token)"]
    # A series that moves 10.12 -> 10.18 is drawn as a small change, not a full-height swing.
    drawn = c.page.evaluate("""() => {
        const el = document.createElement('div'); el.style.width = '600px'; document.body.appendChild(el);
        const points = [10.12, 10.15, 10.18].map((v, i) => ({x: i, step: i, values: {a: v, r: [0.50, 0.51, 0.52][i]}}));
        window.RftChart.series(el, {points, series: [{key: 'a', label: 'a', unit: 'u'}, {key: 'r', label: 'r', minSpan: 0.2}]});
        const out = [...el.querySelectorAll('g.panel')].map(g => ({
            lo: Number(g.dataset.lo), hi: Number(g.dataset.hi), height: Number(g.dataset.height),
            ys: [...g.querySelectorAll('circle.pt')].map(p => Number(p.getAttribute('cy')))}));
        el.remove(); return out;
    }""")
    for panel, least in zip(drawn, (1.0, 0.2)):
        assert panel["hi"] - panel["lo"] >= least, panel
        assert max(panel["ys"]) - min(panel["ys"]) < 0.2 * panel["height"], panel
    c.close()
