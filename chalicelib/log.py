"""Structured JSON logging (aws-lambda-powertools). Never log keys, hashes or secrets."""
from aws_lambda_powertools import Logger

logger = Logger(service="rft-hub")
