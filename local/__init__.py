"""The local stack: real servers on loopback standing in for AWS, Bedrock and Slack.

Development and test tooling only: never packaged, never imported by chalicelib.
"""
