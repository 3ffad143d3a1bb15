"""The one table of reactions between contexts: which handlers run when a domain event is emitted
(chalicelib/bus.py). Imported once by app.py, so every function of the deployment is wired."""
from __future__ import annotations

from chalicelib import bus
from chalicelib.domain.events import JobAccepted, JobSucceeded
from chalicelib.evaluation import after_training, promotion

bus.wire({
    JobAccepted: [after_training.on_job_accepted],
    JobSucceeded: [promotion.give_suffix_alias, after_training.on_job_succeeded],
})
