"""Which Lambda graders a team may use (issue #19).

A `lambda` grader names a function that Bedrock, the dry runs, preflight and the hosted
grader (for a Lambda inside a `multi` grader) invoke with rft-hub's own roles. So a team may
use only a function that:

* is written exactly as an ARN (`re.fullmatch`, ASCII, no whitespace or trailing newline);
* lives in rft-hub's own partition, account and region (`RFT_ACCOUNT_ID`, else the account
  of `RFT_HOSTED_GRADER_ARN`, which the deploy template and the local stage both set; the
  region is the Lambda's own `AWS_REGION`);
* is named `rft-grader-*` (the only team functions the IAM policies let rft-hub invoke) and
  is not one of rft-hub's own functions (`rft-hub-*`, the hosted grader);
* was registered to that team by an admin (`POST /v1/admin/teams/{id}/lambda_graders`).
  A function belongs to at most one team: the registration and an owner record keyed by the
  function name are written in one transaction, the owner record conditionally.

Qualifiers: a registration names the function (an unqualified ARN). A job, dry run or saved
grader may name a version or alias of a registered function (`:3`, `:prod`, `:$LATEST`): the
code behind them is the same team's, and the IAM policy covers them alike.
"""
from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass

from pynamodb.exceptions import TransactWriteError

from chalicelib.config import settings
from chalicelib.domain import ids
from chalicelib.domain.graders import Grader
from chalicelib.domain.graders.core import LambdaGrader, Multi
from chalicelib.errors import Conflict, InvalidRequest, NotFound, ServiceUnavailable
from chalicelib.platform import audit
from chalicelib.store import dynamo
from chalicelib.store.models import LambdaGraderOwner, LambdaGraderRegistration

NAME_PREFIX = "rft-grader-"
OWN_PREFIX = "rft-hub-"          # every function of the app is deployed as rft-hub-<stage>-<name>
_ARN = re.compile(r"arn:(?P<partition>aws|aws-cn|aws-us-gov):lambda:(?P<region>[a-z]{2}(?:-gov)?-[a-z]+-[0-9]):"
                  r"(?P<account>[0-9]{12}):function:(?P<name>[A-Za-z0-9_-]{1,64})"
                  r"(?::(?P<qualifier>\$LATEST|[A-Za-z0-9_-]{1,128}))?")
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
INVALID = "invalid_grader"


@dataclass(frozen=True)
class FunctionArn:
    partition: str
    region: str
    account: str
    name: str
    qualifier: str | None

    @property
    def unqualified(self) -> str:
        return f"arn:{self.partition}:lambda:{self.region}:{self.account}:function:{self.name}"


def parse(arn: object) -> FunctionArn | None:
    match = _ARN.fullmatch(arn) if isinstance(arn, str) and arn.isascii() else None
    return FunctionArn(**match.groupdict()) if match else None


def home() -> tuple[str, str, str]:
    """(partition, region, account) of rft-hub itself: the only place team graders may live."""
    hosted = parse(os.environ.get("RFT_HOSTED_GRADER_ARN", ""))
    account = os.environ.get("RFT_ACCOUNT_ID") or (hosted.account if hosted else None)
    if not account:
        raise ServiceUnavailable("Lambda graders are not configured on this deployment "
                                 "(RFT_ACCOUNT_ID or RFT_HOSTED_GRADER_ARN).")
    return (hosted.partition if hosted else "aws"), settings().region, account


def _refuse(message: str, param: str, code: str | None = INVALID) -> InvalidRequest:
    return InvalidRequest(message, param=param, code=code)


def check_function(arn: object, param: str, *, registering: bool = False) -> FunctionArn:
    """The rules that do not depend on the team. Raises InvalidRequest naming `param`."""
    code = None if registering else INVALID
    fn = parse(arn)
    if fn is None:
        raise _refuse(f"'{param}' must be exactly a Lambda function ARN like arn:aws:lambda:<region>:<account>:"
                      f"function:{NAME_PREFIX}<name> (no spaces or line breaks).", param, code)
    partition, region, account = home()
    hosted = parse(os.environ.get("RFT_HOSTED_GRADER_ARN", ""))
    if (fn.partition, fn.region, fn.account) != (partition, region, account):
        raise _refuse(f"'{param}': Lambda graders must be deployed in rft-hub's account {account}, "
                      f"region {region}.", param, code)
    if fn.name.startswith(OWN_PREFIX) or (hosted is not None and fn.name == hosted.name):
        raise _refuse(f"'{param}': rft-hub's own functions cannot be used as graders; declarative graders "
                      "run in the hosted grader without naming it.", param, code)
    if not fn.name.startswith(NAME_PREFIX) or len(fn.name) == len(NAME_PREFIX):
        raise _refuse(f"'{param}': Lambda graders must be named {NAME_PREFIX}<name>.", param, code)
    if registering and fn.qualifier is not None:
        raise _refuse(f"'{param}': register the function itself (an ARN without ':{fn.qualifier}'); "
                      "jobs may then name any version or alias of it.", param, code)
    return fn


def _owner(name: str) -> str | None:
    owner = dynamo.get_or_none(LambdaGraderOwner, name, consistent_read=True, what="lambda grader owner")
    return owner.team_id if owner is not None else None


def _registration(team_id: str, name: str) -> LambdaGraderRegistration | None:
    return dynamo.get_or_none(LambdaGraderRegistration, team_id, name, consistent_read=True,
                              what="lambda grader registration")


def require(team_id: str | None, arn: str, param: str) -> None:
    """A team may use a function registered to it. Without a team (no route calls it so), the
    function must still be registered, to some team."""
    fn = check_function(arn, param)
    registered = _owner(fn.name) is not None if team_id is None else _registration(team_id, fn.name) is not None
    if not registered:   # another team's function reads exactly like an unregistered one
        raise _refuse(f"'{param}': Lambda function '{fn.name}' is not registered to this team; an rft-hub admin "
                      f"must register it (POST /v1/admin/teams/<team id>/lambda_graders).", param)


def lambda_functions(grader: Grader, param: str) -> Iterator[tuple[str, str]]:
    """(ARN, param) of every Lambda in a compiled grader, nested `multi` graders included."""
    if isinstance(grader, LambdaGrader):
        yield grader.arn, f"{param}.lambda.function"
    elif isinstance(grader, Multi):
        for name, sub in grader.graders.items():
            yield from lambda_functions(sub, f"{param}.graders.{name}")


def check(team_id: str | None, grader: Grader, param: str) -> None:
    for arn, where in lambda_functions(grader, param):
        require(team_id, arn, where)


# ---- registration (admin) ---------------------------------------------------------------------

def view(r: LambdaGraderRegistration) -> dict:
    return {"object": "lambda_grader", "name": r.function_name, "function_arn": r.function_arn,
            "team_id": r.team_id, "created_at": r.created_at}


def register(team_id: str, function_arn: str) -> tuple[int, dict]:
    """(201, registration), or (200, the existing one) when this team already has it (a retry)."""
    fn = check_function(function_arn, "function_arn", registering=True)

    def existing() -> tuple[int, dict] | None:
        owner = _owner(fn.name)
        if owner is None:
            return None
        if owner != team_id:
            raise Conflict(f"Lambda function '{fn.name}' is registered to another team; a function "
                           "belongs to one team.", param="function_arn")
        return 200, view(_registration(team_id, fn.name))

    found = existing()
    if found:
        return found
    now = ids.now()
    record = LambdaGraderRegistration(team_id, fn.name, function_arn=fn.unqualified, created_at=now)

    def write(tx) -> None:
        tx.save(LambdaGraderOwner(fn.name, team_id=team_id, created_at=now),
                condition=LambdaGraderOwner.function_name.does_not_exist())
        tx.save(record)

    act = audit.Act("lambda_grader.registered", f"lambda_grader:{fn.name}", team_id,
                    after={"function_arn": fn.unqualified})
    try:   # a repeat after an unknown outcome meets its own owner record: answered as a retry below
        audit.commit(act, write, what="lambda grader registration")
    except TransactWriteError as exc:
        if not dynamo.is_condition(exc):
            raise
        found = existing()   # registered meanwhile: by this team (the same answer) or another (409)
        if found:
            return found
        raise
    return 201, view(record)


def list_registered(team_id: str) -> list[dict]:
    return [view(r) for r in dynamo.call(lambda: list(LambdaGraderRegistration.query(team_id, consistent_read=True)),
                                         idempotent=True, what="lambda grader list")]


def unregister(team_id: str, name: str) -> dict:
    if not _NAME.fullmatch(name or ""):
        raise InvalidRequest("name must be a Lambda function name (letters, digits, '-' and '_').", param="name")
    missing = NotFound(f"No Lambda grader '{name}' is registered to this team.", param="name")
    record = _registration(team_id, name)
    if record is None:
        raise missing

    def write(tx) -> None:
        tx.delete(record, condition=LambdaGraderRegistration.function_name.exists())
        tx.delete(LambdaGraderOwner(name), condition=LambdaGraderOwner.team_id == team_id)

    act = audit.Act("lambda_grader.unregistered", f"lambda_grader:{name}", team_id,
                    before={"function_arn": record.function_arn})
    try:
        audit.commit(act, write, what="lambda grader removal")
    except TransactWriteError as exc:
        if not dynamo.is_condition(exc):
            raise
        raise missing from None
    return {**view(record), "deleted": True}
