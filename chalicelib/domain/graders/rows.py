"""The fields rft-hub writes into every training row it hands Bedrock, so the hosted grader can
tell, from a sample alone, which grader scores it, which job it belongs to and which prompt it
answers (Bedrock passes a row's fields through to the reward Lambda). One stamping for both job
families (Mantle uploads and Nova's S3 rows)."""
from __future__ import annotations

REF_FIELD = "rft_grader_ref"  # the compiled grader's reference
JOB_FIELD = "rft_job"         # "<team id>/<job id>"
PROMPT_FIELD = "rft_prompt"   # the row's id or line: groups a prompt's samples
OWN_FIELDS = frozenset({REF_FIELD, JOB_FIELD, PROMPT_FIELD})


def stamp(row: dict, grader_ref: str, team_id: str, job_id: str, line: int) -> dict:
    """`row` with rft-hub's fields written in (in place; returned for convenience)."""
    row[REF_FIELD] = grader_ref
    row[JOB_FIELD] = f"{team_id}/{job_id}"
    own = row.get("id")
    row[PROMPT_FIELD] = own if isinstance(own, str) and own else f"line-{line}"
    return row
