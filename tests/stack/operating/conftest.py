"""These tests read the app's metrics from moto's CloudWatch: the stack's collector takes them there
while they run (local/cloudwatch.py; off for the rest of the suite)."""
import pytest


@pytest.fixture(autouse=True)
def collected(stack):
    stack.cloudwatch.install()
    yield
    stack.cloudwatch.drain()
    stack.cloudwatch.uninstall()
