"""The one table of reactions between contexts: which handlers run when a domain event is emitted
(chalicelib/bus.py). Imported once by app.py, so every function of the deployment is wired."""
from __future__ import annotations

from chalicelib import bus
from chalicelib.domain.events import EvalRunEnded, JobAccepted, JobEnded, JobSucceeded
from chalicelib.evaluation import after_training, promotion


# Pipelines react only when a run waits (the event names it); their module loads on first use,
# not at every function's cold start.
def _pipeline_job_ended(event: JobEnded) -> None:
    if event.pipeline_run:
        from chalicelib.pipelines import steps
        steps.on_job_ended(event)


def _pipeline_eval_run_ended(event: EvalRunEnded) -> None:
    if event.pipeline_run:
        from chalicelib.pipelines import steps
        steps.on_eval_run_ended(event)


bus.wire({
    JobAccepted: [after_training.on_job_accepted],
    JobSucceeded: [promotion.give_suffix_alias, after_training.on_job_succeeded],
    JobEnded: [_pipeline_job_ended],
    EvalRunEnded: [_pipeline_eval_run_ended],
})
