"""rft-hub: reinforcement fine-tuning on Amazon Bedrock as an internal service.

Layout (outer layers depend on inner ones, never the reverse):
  domain/    pure logic: validation, state machine, pricing. No I/O.
  store/     PynamoDB models (DynamoDB tables).
  adapters/  thin clients for AWS, Bedrock (Mantle) and Slack, created lazily.
  services/  use cases: combine domain rules, the store and adapters.
  api/       Chalice blueprints: request parsing and responses only.
"""
