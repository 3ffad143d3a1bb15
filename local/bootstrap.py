"""Creates what the deployed template declares, on the local servers. Idempotent."""
from __future__ import annotations

import boto3

from chalicelib.config import settings
from chalicelib.store.models import create_tables


def bootstrap(admin_key: str) -> None:
    s = settings()
    create_tables()
    s3 = boto3.client("s3", region_name=s.region)
    existing = {b["Name"] for b in s3.list_buckets().get("Buckets", [])}
    if s.datasets_bucket not in existing:
        s3.create_bucket(Bucket=s.datasets_bucket, CreateBucketConfiguration={"LocationConstraint": s.region})
    sm = boto3.client("secretsmanager", region_name=s.region)
    try:
        sm.put_secret_value(SecretId=s.admin_key_secret_id, SecretString=admin_key)
    except sm.exceptions.ResourceNotFoundException:
        sm.create_secret(Name=s.admin_key_secret_id, SecretString=admin_key)
