"""A person's decision on a run waiting for approval (issue #27): only a listed approver decides,
once (a conditional write on the run; a repeated click answers with the decision already made),
and the decision answers the approval step's task token."""
from __future__ import annotations

from chalicelib.domain import ids
from chalicelib.domain import slack_messages as messages
from chalicelib.errors import Conflict, Forbidden, InvalidRequest, NotFound
from chalicelib.pipelines import runs, steps
from chalicelib.store.models import PipelineRun

DECISIONS = ("approve", "reject")


def decide(team_id: str, pipeline_id: str, run_id: str, decision: str, slack_user: str, via: str) -> dict:
    """Returns {"run": <run view>, "decided": bool (False: it was decided before), "late": bool}."""
    if decision not in DECISIONS:
        raise InvalidRequest("decision must be 'approve' or 'reject'.", param="decision")
    run = runs.get_run(pipeline_id, run_id)
    if run is None or run.team_id != team_id:
        raise NotFound(f"No run '{run_id}' of pipeline '{pipeline_id}'.", param="run_id")
    cfg = steps.spec_of(run)["approval"]
    if cfg["mode"] != "slack" or slack_user not in cfg.get("approvers", []):
        raise Forbidden("Only the pipeline's listed approvers may decide on its runs.", param="user",
                        code="not_an_approver")
    if run.approval:
        if run.approval.get("decision") != decision:
            raise Conflict(f"This run was already {messages.DECIDED[run.approval['decision']]} by {run.approval['by']}.",
                           param="decision", code="already_decided")
        return {"run": runs.run_view(run), "decided": False, "late": False}
    if run.waiting_step != "approval":
        raise Conflict(f"The run is {run.status}; it is not waiting for approval.", param="run_id",
                       code="not_awaiting_approval")
    record = {"decision": decision, "by": slack_user, "at": ids.now(), "via": via}
    if not runs.save_fields(run, [PipelineRun.approval.set(record)],
                            condition=PipelineRun.approval.does_not_exist() & (PipelineRun.waiting_step == "approval")):
        return decide(team_id, pipeline_id, run_id, decision, slack_user, via)     # decided meanwhile
    run.refresh(consistent_read=True)
    if decision == "approve":
        sent = runs.complete(run, "approval", output={"approved_by": slack_user})
    else:
        sent = runs.complete(run, "approval", error="rft.Rejected", cause=f"rejected by {slack_user}")
    if not sent:          # the approval had timed out just before: the run is rejected, whatever was clicked
        runs.save_fields(run, [PipelineRun.approval.set({**record, "late": True})])
    run.refresh(consistent_read=True)
    return {"run": runs.run_view(run), "decided": sent, "late": not sent}
