"""The one table of reactions between contexts: which handlers run when a domain event is emitted
(chalicelib/bus.py). Imported once by app.py, so every function of the deployment is wired."""
from __future__ import annotations

from chalicelib import bus
from chalicelib.domain.events import EvalRunEnded, JobAccepted, JobEnded, JobSucceeded
from chalicelib.evaluation import after_training, promotion
from chalicelib.pipelines import steps as pipeline_steps

bus.wire({
    JobAccepted: [after_training.on_job_accepted],
    JobSucceeded: [promotion.give_suffix_alias, after_training.on_job_succeeded],
    JobEnded: [pipeline_steps.on_job_ended],
    EvalRunEnded: [pipeline_steps.on_eval_run_ended],
})
