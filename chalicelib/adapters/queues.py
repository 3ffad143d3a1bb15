"""SQS by queue name: the one place a name becomes its URL and a message is sent.

A queue's URL never changes for a name (account and region are the deployment's), so each warm
instance looks it up once. Clients come from adapters/aws.py (timeouts fit the request's deadline).
"""
from __future__ import annotations

import threading

from chalicelib.adapters import aws

_urls: dict[str, str] = {}
_lock = threading.Lock()


def url(name: str) -> str:
    with _lock:
        found = _urls.get(name)
    if found is None:
        found = aws.sqs().get_queue_url(QueueName=name)["QueueUrl"]
        with _lock:
            _urls[name] = found
    return found


def send(name: str, body: str, *, delay: int = 0, **extra) -> None:
    """Sends one message; `delay` in seconds (standard queues only: FIFO queues take none), `extra`
    as SQS's SendMessage takes it (MessageGroupId, MessageDeduplicationId, MessageAttributes)."""
    if delay:
        extra["DelaySeconds"] = delay
    aws.sqs().send_message(QueueUrl=url(name), MessageBody=body, **extra)
