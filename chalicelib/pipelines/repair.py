"""The pipelines' reconciler (issue #27): runs are driven by events and messages, which are best
effort; this pass, on a schedule, repairs what one of them lost."""
from __future__ import annotations

from botocore.exceptions import ClientError
from pynamodb.exceptions import DoesNotExist, PynamoDBException, UpdateError

from chalicelib.adapters import aws
from chalicelib.domain import ids
from chalicelib.domain import pipelines as rules
from chalicelib.errors import ApiError
from chalicelib.log import logger
from chalicelib.pipelines import runs, steps
from chalicelib.store import dynamo
from chalicelib.store.models import PipelineRecord


def reconcile(now: int | None = None) -> dict:
    """Every active run: an execution that ended without the run's end (aborted, timed out, its last
    message lost) ends the run as failed; an execution never started is started; a waiting step
    whose job or eval runs have ended is completed (pipelines/steps.py)."""
    now = now or ids.now()
    report = {"checked": 0, "finished": 0, "started": 0, "advanced": 0, "failed": 0}
    for p in PipelineRecord.scan(filter_condition=PipelineRecord.active_run.exists()):
        report["checked"] += 1
        try:
            run = runs.get_run(p.pipeline_id, p.active_run)
            if run is None or run.status in rules.ENDINGS:
                _free(p)
                continue
            if not run.execution_arn:
                if run.created_at < now - 60:
                    runs.start_execution(run, p.spec["approval"])
                    report["started"] += 1
                continue
            described = aws.stepfunctions().describe_execution(executionArn=run.execution_arn)
            if described["status"] != "RUNNING":
                run.refresh(consistent_read=True)
                if run.status not in rules.ENDINGS:
                    runs.finish(run, "failed", error={"step": runs.current_step(run),
                                                 "message": f"the run's execution ended {described['status']} "
                                                            "before the run recorded its end"})
                    report["finished"] += 1
                continue
            report["advanced"] += int(steps.advance(run))
        except (ApiError, PynamoDBException, ClientError, DoesNotExist) as exc:
            report["failed"] += 1
            logger.warning("pipeline run not reconciled", extra={"pipeline_id": p.pipeline_id,
                                                                  "error": type(exc).__name__})
    return report


def _free(p: PipelineRecord) -> None:
    try:
        p.update(actions=[PipelineRecord.active_run.remove()], condition=PipelineRecord.active_run == p.active_run)
    except UpdateError as err:
        if not dynamo.is_condition(err):
            raise


