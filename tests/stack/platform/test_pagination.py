"""List endpoints and reward readers page with DynamoDB cursors: bounded reads, whatever the history.

Records are written straight into DynamoDB Local with PynamoDB (test setup: creating 1,000 jobs
through Bedrock would take minutes); everything read goes through rft-hub over HTTP (the openai SDK,
its auto-pagination) or in-process, against the real servers.

Items read are counted from DynamoDB's own answers: PynamoDB's `pre/post_dynamodb_send` signals
carry no response, so the test wraps (and calls through) PynamoDB's one send function,
`Connection._make_api_call`, and adds up each Query's `ScannedCount` (items evaluated, before any
filter), 1 per GetItem that found an item and each BatchGetItem's items.
"""
from __future__ import annotations

import json
import threading

import openai
import pytest
from pynamodb.connection import base as ddb_base

from chalicelib.domain import ids
from chalicelib.slack import commands as slack_commands
from chalicelib.store import pagination
from chalicelib.store.models import Checkpoint, File, Job, JobEvent, SlackChannel
from chalicelib.training import record as job_record
from chalicelib.training import rewards as job_rewards
from chalicelib.training import state

READ_OPS = {"Query", "Scan", "GetItem", "BatchGetItem"}
N_JOBS = 1000
PAGE = 100


class Reads:
    """Every DynamoDB read made in this process: operation, table, items read, thread, request text."""

    def __init__(self) -> None:
        self.calls: list[dict] = []
        self.lock = threading.Lock()

    def record(self, operation: str, kwargs: dict, data: dict) -> None:
        if operation in ("Query", "Scan"):
            items = int(data.get("ScannedCount") or 0)
        elif operation == "GetItem":
            items = 1 if data.get("Item") else 0
        else:
            items = sum(len(v) for v in (data.get("Responses") or {}).values())
        with self.lock:
            self.calls.append({"op": operation, "table": kwargs.get("TableName"), "items": items,
                               "thread": threading.get_ident(), "text": json.dumps(kwargs, default=str)})

    def mark(self) -> int:
        with self.lock:
            return len(self.calls)

    def since(self, mark: int, end: int | None = None, *, about: str | tuple | None = None,
              table: str | None = None,
              this_thread: bool = False) -> list[dict]:
        with self.lock:
            calls = self.calls[mark:end]
        me = threading.get_ident()
        abouts = (about,) if isinstance(about, str) else about
        return [c for c in calls if (abouts is None or any(a in c["text"] for a in abouts))
                and (table is None or c["table"] == table) and (not this_thread or c["thread"] == me)]


@pytest.fixture(scope="module")
def reads():
    spy = Reads()
    real = ddb_base.Connection._make_api_call

    def counted(self, operation_name, operation_kwargs):
        data = real(self, operation_name, operation_kwargs)
        if operation_name in READ_OPS:
            spy.record(operation_name, operation_kwargs, data or {})
        return data

    ddb_base.Connection._make_api_call = counted
    yield spy
    ddb_base.Connection._make_api_call = real


def _items(calls: list[dict]) -> int:
    return sum(c["items"] for c in calls)


def _team(api, name: str) -> tuple[str, str]:
    from local.harness import ADMIN_KEY
    admin = {"Authorization": f"Bearer {ADMIN_KEY}", "Content-Type": "application/json"}
    team = api.http.post("/v1/admin/teams", headers=admin, body=json.dumps({"name": name})).json_body
    key = api.http.post(f"/v1/admin/teams/{team['id']}/keys", headers=admin).json_body
    return team["id"], key["key"]


class Pages:
    """An openai SDK client whose HTTP client notes which DynamoDB reads each request caused."""

    def __init__(self, stack, key: str, reads: Reads) -> None:
        self.requests: list[dict] = []
        self.reads = reads

        def on_request(request):
            self.requests.append({"url": str(request.url), "start": reads.mark()})

        def on_response(response):
            self.requests[-1]["end"] = reads.mark()

        http_client = openai.DefaultHttpxClient(event_hooks={"request": [on_request], "response": [on_response]})
        self.client = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=key, max_retries=0,
                                    http_client=http_client)

    def reads_of(self, request: dict, **filters) -> list[dict]:
        return self.reads.since(request["start"], request["end"], **filters)


def _job(team_id: str, job_id: str, created_at: int, **extra) -> Job:
    return Job(team_id, job_id, status="succeeded", model="openai.gpt-oss-20b", training_file="file-pg",
               method={"type": "reinforcement", "reinforcement": {"grader": {"type": "lambda"}}},
               bedrock_method={}, created_at=created_at, updated_at=created_at, finished_at=created_at,
               request_hash="pg", submit_state="submitted", status_path=["validating_files", "succeeded"],
               **extra)


@pytest.fixture(scope="module")
def big_team(api):
    """A team with 1,000 jobs; every 7th has metadata group=a. Pairs share a created_at (ties)."""
    team_id, key = _team(api, "pagination-1000")
    base = ids.now() - 100_000
    written = {}
    with Job.batch_write() as batch:
        for i in range(N_JOBS):
            job = _job(team_id, ids.new_id("ftjob"), base + i // 2,
                       metadata={"group": "a" if i % 7 == 0 else "b", "i": str(i)})
            batch.save(job)
            written[job.job_id] = job
    return team_id, key, written


def test_sdk_auto_pagination_yields_every_job_once_newest_first_with_bounded_reads(stack, big_team, reads):
    team_id, key, written = big_team
    pages = Pages(stack, key, reads)
    seen = [job for job in pages.client.fine_tuning.jobs.list(limit=PAGE)]

    ids_seen = [j.id for j in seen]
    assert len(ids_seen) == N_JOBS and set(ids_seen) == set(written)          # all, exactly once
    created = [j.created_at for j in seen]
    assert created == sorted(created, reverse=True)                          # newest first
    assert len(pages.requests) == N_JOBS // PAGE                             # has_more exact: no 11th call

    per_page = []
    for request in pages.requests:
        jobs_table = _items(pages.reads_of(request, about=team_id, table=Job.Meta.table_name))
        team_reads = _items(pages.reads_of(request, about=team_id))
        per_page.append((jobs_table, team_reads))
        # limit + 1 from the index, + 1 GetItem of the `after` job; a little for auth.
        assert jobs_table <= PAGE + 2, per_page
        assert team_reads <= PAGE + 5, per_page
    print(f"\njobs: items read per page (jobs table, all team reads): {per_page}")


def test_page_boundaries_cursor_and_has_more(api, big_team, reads):
    team_id, key, written = big_team
    auth = {"Authorization": f"Bearer {key}"}
    ordered, after = [], ""      # the listing's own order (ties on created_at in DynamoDB's key order)
    while True:
        page = api.http.get(f"/v1/fine_tuning/jobs?limit=100{after}", headers=auth).json_body
        ordered += [written[j["id"]] for j in page["data"]]
        if not page["has_more"]:
            break
        after = f"&after={page['data'][-1]['id']}"
    assert [j.created_at for j in ordered] == sorted((j.created_at for j in written.values()), reverse=True)

    first = api.http.get("/v1/fine_tuning/jobs?limit=3", headers=auth).json_body
    assert [j["id"] for j in first["data"]] == [j.job_id for j in ordered[:3]]
    assert first["has_more"] is True and first["rft_next_cursor"].startswith("rftc1.")

    by_id = api.http.get(f"/v1/fine_tuning/jobs?limit=3&after={first['data'][-1]['id']}", headers=auth).json_body
    by_cursor = api.http.get(f"/v1/fine_tuning/jobs?limit=3&after={first['rft_next_cursor']}",
                             headers=auth).json_body
    assert [j["id"] for j in by_id["data"]] == [j["id"] for j in by_cursor["data"]]
    assert not {j["id"] for j in by_id["data"]} & {j["id"] for j in first["data"]}

    last = api.http.get(f"/v1/fine_tuning/jobs?limit=5&after={ordered[-6].job_id}", headers=auth).json_body
    assert len(last["data"]) == 5 and last["has_more"] is False and last["rft_next_cursor"] is None
    assert last["data"][-1]["id"] == ordered[-1].job_id
    end = api.http.get(f"/v1/fine_tuning/jobs?limit=5&after={ordered[-1].job_id}", headers=auth).json_body
    assert end["data"] == [] and end["has_more"] is False
    unknown = api.http.get("/v1/fine_tuning/jobs?after=ftjob-nope", headers=auth).json_body
    assert unknown == {"object": "list", "data": [], "has_more": False, "rft_next_cursor": None}

    # A cursor names its partition: another team's cursor, or a forged one, is a 400, never followed.
    _, other_key = _team(api, "pagination-other")
    stolen = api.http.get(f"/v1/fine_tuning/jobs?after={first['rft_next_cursor']}",
                          headers={"Authorization": f"Bearer {other_key}"})
    assert stolen.status_code == 400 and stolen.json_body["error"]["param"] == "after"
    forged = [pagination.encode_cursor(k) for k in (
        {"team_id": {"S": team_id}, "job_id": {"S": "x"}},                                  # not this index's key
        {"team_id": {"S": team_id}, "job_id": {"S": "x"}, "created_at": {"N": "NaN"}},       # not a DynamoDB number
        {"team_id": {"S": team_id}, "job_id": {"S": "x" * 1100}, "created_at": {"N": "1"}},  # longer than a key
        {"team_id": {"S": team_id}, "job_id": {"N": "1"}, "created_at": {"N": "1"}})]        # wrong type
    for bad in ("rftc1.!!!", "rftc1.", "rftc1." + "A" * 3000, *forged):
        r = api.http.get(f"/v1/fine_tuning/jobs?after={bad}", headers=auth)
        assert r.status_code == 400 and r.json_body["error"]["param"] == "after", bad
    huge = api.http.get("/v1/fine_tuning/jobs?after=" + "%C3%A9" * 600, headers=auth)   # 1,200 bytes: no lookup
    assert huge.status_code == 200 and huge.json_body["data"] == []


def test_metadata_filter_pages_on_until_limit_matches_within_a_bounded_read(stack, big_team, reads):
    team_id, key, written = big_team
    expected = sorted((j for j in written.values() if j.metadata["group"] == "a"),
                      key=lambda j: j.created_at, reverse=True)
    pages = Pages(stack, key, reads)
    seen = list(pages.client.fine_tuning.jobs.list(limit=20, metadata={"group": "a"}))
    assert sorted(j.id for j in seen) == sorted(j.job_id for j in expected)
    assert len(seen) == len({j.id for j in seen}) == 143
    assert [j.created_at for j in seen] == sorted((j.created_at for j in seen), reverse=True)
    budget = state.METADATA_PAGES * state.METADATA_PAGE_SIZE
    per_page = [_items(pages.reads_of(r, about=team_id, table=Job.Meta.table_name)) for r in pages.requests]
    assert all(n <= budget + 1 for n in per_page), per_page
    print(f"\njobs metadata[group]=a (1 in 7), limit 20: items read per page {per_page}")

    # A filter nothing matches stops at its budget, says has_more, and the cursor goes on from there.
    one = pages.client.fine_tuning.jobs.list(limit=20, metadata={"group": "zzz"})
    assert one.data == []
    raw = {"has_more": one.has_more, **(one.model_extra or {})}
    assert raw["has_more"] is True and raw["rft_next_cursor"]
    spent = [_items(pages.reads_of(pages.requests[-1], about=team_id, table=Job.Meta.table_name))]
    while raw.get("has_more"):
        nxt = pages.client.fine_tuning.jobs.list(limit=20, metadata={"group": "zzz"},
                                                  after=raw["rft_next_cursor"])
        assert nxt.data == []
        raw = {"has_more": nxt.has_more, **(nxt.model_extra or {})}
        spent.append(_items(pages.reads_of(pages.requests[-1], about=team_id, table=Job.Meta.table_name)))
    assert all(n <= budget for n in spent) and sum(spent) <= N_JOBS + len(spent), spent
    print(f"jobs metadata[group]=zzz (no match): items read per request {spent}")


def test_slack_rft_jobs_answers_from_one_bounded_query(big_team, reads):
    team_id, _, written = big_team
    SlackChannel("TPAGES", "CPAGES", team_id=team_id).save()
    mark = reads.mark()
    answer = slack_commands.command({"team_id": "TPAGES", "channel_id": "CPAGES", "text": "jobs"})
    calls = reads.since(mark, this_thread=True)
    text = json.dumps(answer)
    newest = sorted(written.values(), key=lambda j: j.created_at, reverse=True)[:10]
    assert "10 most recent jobs" in text and all(j.job_id in text for j in newest)
    job_queries = [c for c in calls if c["table"] == Job.Meta.table_name]
    assert len(job_queries) == 1 and job_queries[0]["items"] <= 11
    # + the channel, and per job its reward summary (one GetItem) and a bounded window for jobs
    # without one (these have no events at all: empty).
    assert _items(calls) <= 11 + 1 + 10 * 2 and len(calls) <= 1 + 1 + 10 * 2, calls
    print(f"\n/rft jobs for a 1,000-job team: {_items(calls)} items read in {len(calls)} calls")


# ---- events, rewards, checkpoints, files ----------------------------------------------------------

def _one_job(api, name: str):
    team_id, key = _team(api, name)
    job = _job(team_id, ids.new_id("ftjob"), ids.now() - 10_000)
    job.save()
    return team_id, key, job


def test_events_page_newest_first_with_after_ids_of_both_kinds(api, stack, reads):
    team_id, key, job = _one_job(api, "pagination-events")
    written = []   # oldest first: (seq, id)
    seq = 0
    rewards = []
    for i in range(250):
        seq += 1
        if i % 5 == 0:      # a Bedrock metrics event, Bedrock's own id
            reward = round(0.2 + 0.6 * ((i * 37) % 100) / 100, 4)
            rewards.append(reward)
            event_id, kind, data, source = f"ftevent-bedrock-{i:04d}", "metrics", \
                {"step": i // 5 + 1, "critic_rewards_mean": reward}, "bedrock"
        else:
            event_id, kind, data, source = ids.new_id("ftevent"), "message", None, "rft-hub"
        job_record.save_event(job.job_id, seq, event_id=event_id, created_at=job.created_at + i, level="info",
                                 message=f"event {i}", type_=kind, data=data, source=source)
        written.append((seq, event_id))
        if i == 120:        # a concurrent sync copied this Bedrock event twice, next to each other
            seq += 1
            job_record.save_event(job.job_id, seq, event_id=event_id, created_at=job.created_at + i,
                                     level="info", message=f"event {i}", type_=kind, data=data, source=source)
    Job(team_id, job.job_id).update(actions=[Job.event_seq.set(seq)])

    pages = Pages(stack, key, reads)
    seen = list(pages.client.fine_tuning.jobs.list_events(job.job_id, limit=40))
    expected = [event_id for _, event_id in reversed(written)]
    assert [e.id for e in seen] == expected                       # newest first, each once, dup hidden
    assert len(pages.requests) == 7
    # Reads about this job, or about the `after` event (its key, from the keys-only index).
    per_page = [_items(pages.reads_of(r, about=(job.job_id, *(i for _, i in written)))) for r in pages.requests]
    # limit + 1 events, + the job (GetItem) + the `after` event's key, + 1 copy hidden on one page.
    assert all(n <= 40 + 1 + 2 + 1 for n in per_page), per_page
    print(f"\nevents (251 stored, limit 40): items read per page {per_page}")

    auth = {"Authorization": f"Bearer {key}"}
    page = api.http.get(f"/v1/fine_tuning/jobs/{job.job_id}/events?limit=10", headers=auth).json_body
    assert page["has_more"] is True and len(page["data"]) == 10
    after_bedrock = next(e for e in page["data"] if e["id"].startswith("ftevent-bedrock"))["id"]
    nxt = api.http.get(f"/v1/fine_tuning/jobs/{job.job_id}/events?limit=3&after={after_bedrock}",
                       headers=auth).json_body
    i = expected.index(after_bedrock)
    assert [e["id"] for e in nxt["data"]] == expected[i + 1:i + 4]
    tail = api.http.get(f"/v1/fine_tuning/jobs/{job.job_id}/events?limit=3&after={expected[-4]}",
                        headers=auth).json_body
    assert [e["id"] for e in tail["data"]] == expected[-3:] and tail["has_more"] is False
    by_cursor = api.http.get(f"/v1/fine_tuning/jobs/{job.job_id}/events?limit=3&after={page['rft_next_cursor']}",
                             headers=auth).json_body
    assert [e["id"] for e in by_cursor["data"]] == expected[10:13]

    # The reward readers: best from the summary (one GetItem), final from the newest metrics event.
    mark = reads.mark()
    final, best = job_rewards.rewards(job.job_id)
    calls = reads.since(mark, this_thread=True)
    assert (final, best) == (rewards[-1], max(rewards))
    assert _items(calls) <= 1 + job_rewards.REWARD_WINDOW and len(calls) <= 2 + job_rewards.REWARD_WINDOW // 50
    assert job_rewards.reward_curve(job.job_id, 5) == rewards[-5:]
    mark = reads.mark()
    assert slack_commands._best(job.job_id) == f"{max(rewards):.3f}"
    assert [c["op"] for c in reads.since(mark, this_thread=True)] == ["GetItem"]
    print(f"rewards of a 251-event job: {_items(calls)} items read in {len(calls)} calls; "
          f"Slack _best: 1 GetItem")


def test_reward_readers_are_bounded_for_long_and_legacy_histories(api, reads):
    team_id, _, job = _one_job(api, "pagination-long")
    with JobEvent.batch_write() as batch:      # a long history written before the reward summary existed
        for seq in range(1, 1501):
            batch.save(JobEvent(job.job_id, f"{seq:012d}", event_id=f"ev-{seq}", created_at=seq, level="info",
                                message="m", type="metrics", source="bedrock",
                                data={"step": seq, "critic_rewards_mean": 1.0 if seq == 3 else seq / 10_000}))
    mark = reads.mark()
    final, best = job_rewards.rewards(job.job_id)
    calls = reads.since(mark, this_thread=True)
    assert final == 0.15
    # The old all-time best (step 3) is outside the bounded window; the window's best is reported.
    assert best == pytest.approx(0.15)
    assert _items(calls) <= 2 + 2 * job_rewards.REWARD_WINDOW, calls
    print(f"\nrewards of a 1,500-event legacy job: {_items(calls)} items read in {len(calls)} calls")

    # Saved through rft-hub's write path, the best survives any history length.
    job_record.save_event(job.job_id, 1501, event_id="ev-1501", created_at=1501, level="info", message="m",
                             type_="metrics", data={"critic_rewards_mean": 0.9}, source="bedrock")
    job_record.save_event(job.job_id, 1502, event_id="ev-1502", created_at=1502, level="info", message="m",
                             type_="metrics", data={"critic_rewards_mean": 0.4}, source="bedrock")
    job_record._best_noted.clear()     # another process: the conditional write keeps the max
    job_record.save_event(job.job_id, 1503, event_id="ev-1503", created_at=1503, level="info", message="m",
                             type_="metrics", data={"critic_rewards_mean": 0.5}, source="bedrock")
    assert job_rewards.rewards(job.job_id) == (0.5, 0.9)


def test_checkpoints_page_with_first_and_last_ids(api, stack, reads):
    team_id, key, job = _one_job(api, "pagination-checkpoints")
    for step in range(1, 26):
        Checkpoint(job.job_id, f"{step:08d}#ftckpt-{step}", checkpoint_id=f"ftckpt-{step}", step_number=step,
                   created_at=job.created_at + step, fine_tuned_model_checkpoint=f"model:ckpt-{step}").save()
    pages = Pages(stack, key, reads)
    seen = list(pages.client.fine_tuning.jobs.checkpoints.list(job.job_id, limit=10))
    assert [c.step_number for c in seen] == list(range(25, 0, -1))
    assert len(pages.requests) == 3
    per_page = [_items(pages.reads_of(r, about=(job.job_id, "ftckpt-"))) for r in pages.requests]
    assert all(n <= 10 + 1 + 2 for n in per_page), per_page
    print(f"\ncheckpoints (25, limit 10): items read per page {per_page}")

    auth = {"Authorization": f"Bearer {key}"}
    first = api.http.get(f"/v1/fine_tuning/jobs/{job.job_id}/checkpoints?limit=10", headers=auth).json_body
    assert (first["first_id"], first["last_id"], first["has_more"]) == ("ftckpt-25", "ftckpt-16", True)
    last = api.http.get(f"/v1/fine_tuning/jobs/{job.job_id}/checkpoints?limit=10&after=ftckpt-6",
                        headers=auth).json_body
    assert (last["first_id"], last["last_id"], last["has_more"]) == ("ftckpt-5", "ftckpt-1", False)
    none = api.http.get(f"/v1/fine_tuning/jobs/{job.job_id}/checkpoints?after=ftckpt-404", headers=auth).json_body
    assert none["data"] == [] and none["has_more"] is False and none["first_id"] is None


def test_files_page_in_both_orders(api, stack, reads):
    team_id, key = _team(api, "pagination-files")
    base = ids.now() - 5_000
    made = []
    with File.batch_write() as batch:
        for i in range(30):
            f = File(team_id, ids.new_id("file"), filename=f"f{i}.jsonl", purpose="fine-tune", bytes=10,
                     created_at=base + i, status="processed", s3_key=f"files/{team_id}/x{i}.jsonl",
                     validation={"rows": 10})
            batch.save(f)
            made.append(f.file_id)
    pages = Pages(stack, key, reads)
    newest = [f.id for f in pages.client.files.list(limit=10)]
    assert newest == made[::-1] and len(pages.requests) == 3
    oldest = [f.id for f in pages.client.files.list(limit=7, order="asc")]
    assert oldest == made
    per_page = [_items(pages.reads_of(r, about=team_id, table=File.Meta.table_name)) for r in pages.requests]
    assert all(n <= 10 + 2 for n in per_page), per_page
    print(f"\nfiles (30, limit 10 desc then 7 asc): items read per page {per_page}")

    auth = {"Authorization": f"Bearer {key}"}
    page = api.http.get(f"/v1/files?limit=4&after={made[20]}", headers=auth).json_body
    assert [f["id"] for f in page["data"]] == made[19:15:-1]
    assert (page["first_id"], page["last_id"], page["has_more"]) == (made[19], made[16], True)
    page = api.http.get(f"/v1/files?limit=4&order=asc&after={made[25]}", headers=auth).json_body
    assert [f["id"] for f in page["data"]] == made[26:30] and page["has_more"] is False
    assert api.http.get("/v1/files?purpose=batch", headers=auth).json_body["data"] == []
