"""Small helpers shared by the SDK-driven tests."""
import time

from sample_data import arithmetic_rows, jsonl

GRADER = "arn:aws:lambda:us-west-2:123456789012:function:rft-example-exact-match"


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
    f = client.files.create(file=("t.jsonl", jsonl(arithmetic_rows(rows))), purpose="fine-tune")
    return client.fine_tuning.jobs.create(model=model, training_file=f.id, suffix=suffix,
                                          extra_body={"method": method or rft()})
