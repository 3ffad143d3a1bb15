"""Small helpers shared by the SDK-driven tests."""
import json
import time
import urllib.error
import urllib.request

from sample_data import arithmetic_rows, jsonl

from local.example_graders import FUNCTIONS as EXAMPLE_GRADERS
from local.example_graders import arn
from local.harness import ADMIN_KEY

GRADER = arn("rft-grader-example-exact-match")


_owners: dict[str, str] = {}   # function name -> the test team it is registered to now


def register_graders(client, *names):
    """What an admin does before a team may use its Lambda graders: registers the example graders
    (or `names`) to the team behind the SDK client's key, over HTTP. Returns the team id.

    A function belongs to one team, and the local stack has one copy of each example grader, so
    registering one here first unregisters it from the test team that had it before."""
    base = str(client.base_url).rstrip("/")
    team_id = http("GET", f"{base}/me", client.api_key)[1]["team"]["id"]
    for name in names or EXAMPLE_GRADERS:
        url, body = f"{base}/admin/teams/{team_id}/lambda_graders", {"function_arn": arn(name)}
        status, answer = http("POST", url, ADMIN_KEY, body)
        if status == 409 and _owners.get(name, team_id) != team_id:
            http("DELETE", f"{base}/admin/teams/{_owners[name]}/lambda_graders/{name}", ADMIN_KEY)
            status, answer = http("POST", url, ADMIN_KEY, body)
        assert status in (200, 201), answer
        _owners[name] = team_id
    return team_id


def http(method, url, token=None, body=None):
    """(status, JSON body) of one plain HTTP call to a local server."""
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    req = urllib.request.Request(url, method=method, headers=headers,
                                 data=json.dumps(body).encode() if body is not None else None)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"null")


def rft(grader_arn=GRADER, **hyperparameters):
    """An RFT method with a Lambda grader (sent raw: the SDK's typed graders have no "lambda")."""
    reinforcement = {"grader": {"type": "lambda", "lambda": {"function": grader_arn}}}
    if hyperparameters:
        reinforcement["hyperparameters"] = hyperparameters
    return {"type": "reinforcement", "reinforcement": reinforcement}


def wait_for(client, job_id, statuses, timeout=30):
    deadline = time.monotonic() + timeout
    while True:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in statuses:
            return job
        assert time.monotonic() < deadline, f"job {job_id} stuck in {job.status}"
        time.sleep(0.2)


def start_job(client, model="openai.gpt-oss-20b", suffix=None, rows=100, method=None):
    """Uploads rows and starts a job, by default with the example exact-match Lambda grader (registered
    to the client's team first, as an admin would)."""
    if method is None:
        register_graders(client)
    f = client.files.create(file=("t.jsonl", jsonl(arithmetic_rows(rows))), purpose="fine-tune")
    return client.fine_tuning.jobs.create(model=model, training_file=f.id, suffix=suffix,
                                          extra_body={"method": method or rft()})


def wait_submitted(client, job_id, timeout=30):
    """Job creation answers at once; the worker prepares and submits the job (rft_submission)."""
    deadline = time.monotonic() + timeout
    while True:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.model_extra["rft_submission"] not in ("pending", "submitting"):
            return job
        assert time.monotonic() < deadline, f"job {job_id} still {job.model_extra['rft_submission']}"
        time.sleep(0.1)


def drain_notifications(api):
    """Feeds everything on the Slack notification queue to the real handler (what the pump does)."""
    import boto3

    from chalicelib.slack import notifications as slack

    sqs = boto3.client("sqs", region_name="us-west-2")
    url = sqs.get_queue_url(QueueName=slack.notify_queue())["QueueUrl"]
    while True:
        msgs = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, VisibilityTimeout=60).get("Messages", [])
        if not msgs:
            return
        for m in msgs:
            event = api.events.generate_sqs_event(message_bodies=[m["Body"]], queue_name=slack.notify_queue())
            api.lambda_.invoke("slack_notifier", event)
            sqs.delete_message(QueueUrl=url, ReceiptHandle=m["ReceiptHandle"])


def settled(team_id, calls=0, timeout=20.0):
    """The team's ledger and budget period once the ledger holds `calls` entries and nothing is
    set aside: a plain call is booked just after its answer is sent, a stream when its upstream
    ends (which can be after the caller has gone); this instance's idle slices are given back."""
    from chalicelib.domain import budget as budget_rules
    from chalicelib.spend import budgets, ledger, slices

    deadline = time.monotonic() + timeout
    while True:
        entries = ledger.entries(team_id)
        slices.lender().give_back_all()        # what an idle instance's timer does
        item = budgets.period_item(team_id, budget_rules.period_of(time.time()))
        if len(entries) >= calls and not budgets.open_holds(item):
            return entries, item
        assert time.monotonic() < deadline, f"{len(entries)} ledger entries, holds {budgets.open_holds(item)}"
        time.sleep(0.05)


def wait_run(client, eval_id, run_id, timeout=90):
    """An eval run, once it has finished."""
    end = time.monotonic() + timeout
    while True:
        run = client.evals.runs.retrieve(run_id, eval_id=eval_id)
        if run.status in ("completed", "failed", "canceled"):
            return run
        assert time.monotonic() < end, f"eval run {run_id} stuck in {run.status}"
        time.sleep(0.2)


def reconcile_until_ended(client, job_id, timeout):
    """Runs the reconciler until the job has ended (what its schedule does), and returns the job."""
    from chalicelib.training import lifecycle

    deadline = time.monotonic() + timeout
    while True:
        lifecycle.reconcile()
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in ("cancelled", "succeeded", "failed") or time.monotonic() > deadline:
            return job
        time.sleep(0.3)
