"""Pipeline runs (issue #27): a trigger becomes a run (one at a time per pipeline, by a conditional
write on the pipeline), a run is a Step Functions execution of deploy/pipeline.asl.json, each step
is recorded with its times, a step waiting on something outside the run keeps its task token here,
and a run's end releases everything it holds. The reconciler repairs what an event or a message
lost: a run whose execution ended without its record, a step whose job or eval runs ended unseen."""
from __future__ import annotations

import json
import secrets
from datetime import UTC, datetime
from typing import Any

from botocore.exceptions import ClientError
from pynamodb.exceptions import TransactWriteError, UpdateError
from pynamodb.transactions import TransactWrite

from chalicelib import outbox
from chalicelib.adapters import aws
from chalicelib.config import pipeline_state_machine_arn
from chalicelib.domain import ids, pricing
from chalicelib.domain import pipelines as rules
from chalicelib.errors import ApiError, Conflict, InvalidRequest, NotFound
from chalicelib.log import logger
from chalicelib.pipelines import specs
from chalicelib.platform import files
from chalicelib.spend import budgets
from chalicelib.store import dynamo, pagination
from chalicelib.store.models import OutboxEvent, PipelineRecord, PipelineRun, connection

# What the state machine reports when a token's step is already over (timed out, or answered).
GONE = ("TaskTimedOut", "TaskDoesNotExist", "InvalidToken")


def run_view(r: PipelineRun) -> dict:
    return {"id": r.run_id, "object": "pipeline.run", "pipeline_id": r.pipeline_id,
            "pipeline_version": int(r.pipeline_version), "status": r.status, "trigger": r.trigger,
            "steps": r.steps or [], "waiting_on": r.waiting_step, "data": r.data, "job_id": r.job_id,
            "candidate_model": r.candidate_model, "current_model": r.current_model, "eval_runs": r.eval_runs,
            "comparison": r.comparison, "approval": r.approval, "error": r.error,
            "held_usd": pricing.usd(int(r.hold["micro"])) if r.hold and not r.hold.get("released") else None,
            "alias_version": int(r.alias_version) if r.alias_version is not None else None,
            "execution_arn": r.execution_arn, "created_at": r.created_at, "ended_at": r.ended_at}


def get_run(pipeline_id: str, run_id: str) -> PipelineRun | None:
    return dynamo.get_or_none(PipelineRun, pipeline_id, run_id, what="pipeline run", consistent_read=True)


def retrieve(team_id: str, pipeline_id: str, run_id: str) -> dict:
    specs.get(team_id, pipeline_id)
    run = get_run(pipeline_id, run_id)
    if run is None or run.team_id != team_id:
        raise NotFound(f"No run '{files.shown(run_id)}' of pipeline '{pipeline_id}'.", param="run_id")
    return run_view(run)


def list_runs(team_id: str, pipeline_id: str, limit: int, after: str | None) -> dict:
    specs.get(team_id, pipeline_id)
    start = pagination.resume_at(after, PipelineRun, hash_value=pipeline_id,
                                 anchor=lambda rid: get_run(pipeline_id, rid))
    if start is pagination.NOWHERE:
        return pagination.envelope([])
    page = pagination.query(PipelineRun, pipeline_id, limit=limit, start=start, newest_first=True,
                            what="pipeline runs")
    return pagination.envelope([run_view(r) for r in page.items], page)


# ---- triggers ------------------------------------------------------------------------------------

def _run_id(at_ms: int, trigger_id: str | None) -> str:
    """Time-ordered; the same trigger delivered twice (a schedule's time, an event's id) is the same run."""
    tail = ids.stable_id("t", trigger_id)[2:10] if trigger_id else secrets.token_hex(4)
    return f"prun-{at_ms:013x}{tail}"


def _ms(iso: str | None) -> int | None:
    if not isinstance(iso, str):
        return None
    try:
        return int(datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp() * 1000)
    except ValueError:
        return None


def trigger(team_id: str, pipeline_id: str, kind: str, *, trigger_id: str | None = None, at: str | None = None,
            detail: dict | None = None, by: str | None = None) -> dict | None:
    """A trigger: a new run, or, during a run, a `dropped` or `queued` record (the pipeline says
    which). None when the pipeline does not take this kind of trigger (or no longer exists)."""
    try:
        p = specs.get(team_id, pipeline_id)
    except NotFound:
        if kind == "manual":
            raise
        logger.info("trigger for no pipeline", extra={"pipeline_id": pipeline_id, "kind": kind})
        return None
    if kind == "new_data" and not (p.spec["triggers"].get("new_data") and p.spec["dataset"].get("prefix")):
        return None
    now = ids.now()
    run_id = _run_id(_ms(at) or ids.now_ms(), trigger_id)
    seen = get_run(pipeline_id, run_id)
    if seen is not None:
        return run_view(seen)                   # the same trigger, delivered again
    record = {"kind": kind, "id": trigger_id, "at": at or datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
              "by": by, **({"detail": detail} if detail else {})}
    run = PipelineRun(pipeline_id, run_id, team_id=team_id, pipeline_version=p.version, status="running",
                      trigger=record, created_at=now, updated_at=now, steps=[])
    try:
        with TransactWrite(connection=connection()) as tx:
            tx.update(p, actions=[PipelineRecord.active_run.set(run_id), PipelineRecord.last_run.set(run_id)],
                      condition=PipelineRecord.active_run.does_not_exist())
            tx.save(run, condition=PipelineRun.run_id.does_not_exist())
    except TransactWriteError as err:
        if dynamo.is_busy(err):
            raise dynamo.busy_error("pipeline run") from None
        again = get_run(pipeline_id, run_id)
        if again is not None:
            return run_view(again)
        return _busy(specs.get(team_id, pipeline_id), run)
    start_execution(run, p.spec["approval"])
    return run_view(run)


def _busy(p: PipelineRecord, run: PipelineRun) -> dict:
    """A trigger during a run: queued (one at most, on_busy "queue") or recorded as dropped."""
    run.status = "dropped"
    run.ended_at = run.created_at
    run.error = {"step": None, "message": f"a run was in progress ({p.active_run}); this trigger was dropped"}
    if p.spec["triggers"].get("on_busy") == "queue":
        run.status, run.ended_at, run.error = "queued", None, None
        try:
            with TransactWrite(connection=connection()) as tx:
                tx.update(p, actions=[PipelineRecord.queued_trigger.set({"run_id": run.run_id})],
                          condition=PipelineRecord.queued_trigger.does_not_exist()
                          & PipelineRecord.active_run.exists())
                tx.save(run, condition=PipelineRun.run_id.does_not_exist())
            return run_view(run)
        except TransactWriteError as err:
            if dynamo.is_busy(err):
                raise dynamo.busy_error("pipeline run") from None
            run.status, run.ended_at = "dropped", run.created_at
            run.error = {"step": None, "message": "a run was in progress and another trigger was already queued; "
                                                  "this trigger was dropped"}
    dynamo.call(lambda: run.save(condition=PipelineRun.run_id.does_not_exist()), idempotent=True,
                what="pipeline run")
    return run_view(run)


def start_execution(run: PipelineRun, approval: dict) -> None:
    """Starts the run's execution, named after the run (a repeat with the same name and input is
    the same execution). Left to the reconciler when Step Functions does not answer."""
    payload = json.dumps(rules.execution_input(run.team_id, run.pipeline_id, run.run_id, approval))
    try:
        arn = aws.stepfunctions().start_execution(stateMachineArn=pipeline_state_machine_arn(), name=run.run_id,
                                                  input=payload)["executionArn"]
    except ClientError as err:
        if err.response.get("Error", {}).get("Code") != "ExecutionAlreadyExists":
            raise
        arn = pipeline_state_machine_arn().replace(":stateMachine:", ":execution:") + ":" + run.run_id
    except ApiError as err:
        logger.warning("pipeline execution not started; the reconciler retries", extra={"run_id": run.run_id,
                                                                                        "error": err.message})
        return
    save_fields(run, [PipelineRun.execution_arn.set(arn)])


# ---- the run's record ----------------------------------------------------------------------------

def save_fields(run: PipelineRun, actions: list, condition=None) -> bool:
    actions = [*actions, PipelineRun.updated_at.set(ids.now())]
    try:
        dynamo.call(lambda: run.update(actions=actions, condition=condition), idempotent=True, what="pipeline run")
        return True
    except UpdateError as err:
        if dynamo.is_condition(err):
            return False
        raise


def record_step(run: PipelineRun, name: str, status: str, detail: Any = None) -> None:
    """The step's entry: started once (a repeated message keeps the first time), then its end."""
    for _ in range(5):
        steps = [dict(s) for s in (run.steps or [])]
        now = ids.now()
        current = next((s for s in reversed(steps) if s["name"] == name), None)
        if status == "running":
            if current is not None and current["status"] == "running":
                return
            steps.append(rules.step_entry(name, now))
        else:
            if current is None:
                current = rules.step_entry(name, now)
                steps.append(current)
            if current["status"] != "running" and current["status"] == status:
                return
            current.update(status=status, ended_at=now, detail=detail)
        if save_fields(run, [PipelineRun.steps.set(steps)], condition=PipelineRun.updated_at == run.updated_at):
            run.refresh(consistent_read=True)
            return
        run.refresh(consistent_read=True)
    raise dynamo.busy_error("pipeline run")


def wait_on(run: PipelineRun, step: str, token: str, actions: list | None = None) -> None:
    """The step waits for something outside the run (a job, eval runs, a person): its token is kept."""
    save_fields(run, [PipelineRun.waiting_step.set(step), PipelineRun.task_token.set(token), *(actions or [])])
    run.refresh(consistent_read=True)


def send(token: str, *, output: dict | None = None, error: str | None = None, cause: str | None = None) -> bool:
    """Answers a step's token; False when the step is already over (answered, or timed out)."""
    client = aws.stepfunctions()
    try:
        if error:
            client.send_task_failure(taskToken=token, error=error, cause=(cause or "")[:32_000])
        else:
            client.send_task_success(taskToken=token, output=json.dumps(output or {}))
    except ClientError as err:
        if err.response.get("Error", {}).get("Code") in GONE:
            return False
        raise
    return True


def complete(run: PipelineRun, step: str, *, output: dict | None = None, error: str | None = None,
             cause: str | None = None) -> bool:
    """The waiting step is over: its token answered once, then forgotten."""
    if run.waiting_step != step or not run.task_token:
        return False
    token = run.task_token
    # Recorded first: the next step may start the moment the token is answered.
    record_step(run, step, "failed" if error else "succeeded", _said(cause) if error else output)
    sent = send(token, output=output, error=error, cause=cause)
    save_fields(run, [PipelineRun.waiting_step.remove(), PipelineRun.task_token.remove()],
            condition=PipelineRun.task_token == token)
    run.refresh(consistent_read=True)
    return sent


def _said(cause: str | None) -> dict:
    try:
        found = json.loads(cause or "")
    except ValueError:
        found = None
    return found if isinstance(found, dict) else {"message": cause}


def hold(run: PipelineRun, micro: int) -> None:
    """The run's estimate, held against the team's budget when the run has its data (a 429 fails
    the step: the run does not start what the budget cannot pay)."""
    if run.hold:
        return
    held = budgets.reserve(run.team_id, micro, budgets.job_hold_id(job_id_for(run), ids.now_ms()))
    if held.hold_id:
        save_fields(run, [PipelineRun.hold.set({"micro": held.micro, "period": held.period, "hold_id": held.hold_id})])
        run.refresh(consistent_read=True)


def release(run: PipelineRun) -> None:
    """Gives the run's hold back (once): when its job holds its own, or when the run ends."""
    h = run.hold or {}
    if not h.get("hold_id") or h.get("released"):
        return
    budgets.settle(budgets.Reservation(run.team_id, h["period"], int(h["micro"]), h["hold_id"]), 0)
    save_fields(run, [PipelineRun.hold.set({**h, "released": True})])
    run.refresh(consistent_read=True)


def job_id_for(run: PipelineRun) -> str:
    """The job a run creates: the same id however often the step is repeated."""
    return ids.stable_id("ftjob", run.team_id, f"pipeline:{run.pipeline_id}:{run.run_id}")


def finish(run: PipelineRun, status: str, *, error: dict | None = None) -> bool:
    """The run's end, once: its money released, a failed run's job cancelled, the pipeline free for
    the next run (and a queued trigger started), the end announced."""
    if run.status in rules.ENDINGS:
        return False
    release(run)
    if status == "failed" and run.job_id:
        _cancel_job(run)
    now = ids.now()
    p = dynamo.get_or_none(PipelineRecord, run.team_id, run.pipeline_id, what="pipeline", consistent_read=True)
    event = outbox.stage("rft-hub.pipeline.run_finished", run.team_id, pipeline_id=run.pipeline_id,
                         pipeline_name=p.name if p else None, run_id=run.run_id, status=status, error=error,
                         job_id=run.job_id, candidate_model=run.candidate_model, comparison=run.comparison,
                         approval=run.approval, target_alias=p.spec.get("target_alias") if p else None,
                         event_id=f"evt-{run.run_id}-end")
    try:
        with TransactWrite(connection=connection()) as tx:
            tx.update(run, actions=[PipelineRun.status.set(status), PipelineRun.ended_at.set(now),
                                    PipelineRun.updated_at.set(now), PipelineRun.error.set(error),
                                    PipelineRun.waiting_step.remove(), PipelineRun.task_token.remove()],
                      condition=PipelineRun.status.is_in(*rules.ACTIVE))
            if p is not None and p.active_run == run.run_id:
                actions = [PipelineRecord.active_run.remove()]
                if status == "succeeded" and run.data:
                    actions.append(PipelineRecord.last_data_sha256.set(run.data.get("sha256")))
                tx.update(p, actions=actions, condition=PipelineRecord.active_run == run.run_id)
            tx.save(event, condition=OutboxEvent.event_id.does_not_exist())
    except TransactWriteError as err:
        if dynamo.is_busy(err):
            raise dynamo.busy_error("pipeline run") from None
        run.refresh(consistent_read=True)
        if run.status in rules.ENDINGS:
            return False
        raise Conflict("The run changed while it was finishing; retry.", param="run_id") from None
    outbox.publish([event])
    run.refresh(consistent_read=True)
    if p is not None and p.queued_trigger:
        start_queued(run.team_id, run.pipeline_id)
    return True


def _cancel_job(run: PipelineRun) -> None:
    from chalicelib.training import state as job_state
    try:
        job_state.cancel(run.team_id, run.job_id)
    except (Conflict, NotFound):
        pass                      # ended already, or never recorded
    except ApiError as err:
        logger.warning("pipeline job not cancelled", extra={"job_id": run.job_id, "error": err.message})


def start_queued(team_id: str, pipeline_id: str) -> None:
    """The trigger that waited for the last run: now a run of its own."""
    p = dynamo.get_or_none(PipelineRecord, team_id, pipeline_id, what="pipeline", consistent_read=True)
    if p is None or not p.queued_trigger or p.active_run:
        return
    run = get_run(pipeline_id, p.queued_trigger["run_id"])
    try:
        with TransactWrite(connection=connection()) as tx:
            tx.update(p, actions=[PipelineRecord.active_run.set(run.run_id), PipelineRecord.last_run.set(run.run_id),
                                  PipelineRecord.queued_trigger.remove()],
                      condition=PipelineRecord.active_run.does_not_exist()
                      & (PipelineRecord.queued_trigger == p.queued_trigger))
            tx.update(run, actions=[PipelineRun.status.set("running"), PipelineRun.pipeline_version.set(p.version),
                                    PipelineRun.updated_at.set(ids.now())],
                      condition=PipelineRun.status == "queued")
    except TransactWriteError as err:
        if dynamo.is_busy(err):
            raise dynamo.busy_error("pipeline run") from None
        return                     # someone else started it, or a run began meanwhile
    run.refresh(consistent_read=True)
    start_execution(run, p.spec["approval"])


# ---- reactions and repair -----------------------------------------------------------------------

def run_of(ref: str | None) -> PipelineRun | None:
    """`<pipeline id>/<run id>`, as a run's job and eval runs carry it."""
    if not isinstance(ref, str) or "/" not in ref:
        return None
    pipeline_id, run_id = ref.split("/", 1)
    return get_run(pipeline_id, run_id)


def manual(team_id: str, pipeline_id: str, by: str | None, idempotency_key: str | None) -> tuple[int, dict]:
    if idempotency_key is not None and not (0 < len(idempotency_key) <= 200):
        raise InvalidRequest("Idempotency-Key must be 1-200 characters.", param="Idempotency-Key")
    found = trigger(team_id, pipeline_id, "manual", trigger_id=f"{pipeline_id}:{idempotency_key}"
                    if idempotency_key else None, by=by)
    return 201, found


def current_step(run: PipelineRun) -> str | None:
    """The step the run was in: the one running, or waiting, or else the last one it recorded."""
    running = [s["name"] for s in (run.steps or []) if s.get("status") == "running"]
    return running[-1] if running else (run.waiting_step or (run.steps[-1]["name"] if run.steps else None))
