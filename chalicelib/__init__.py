"""rft-hub: reinforcement fine-tuning on Amazon Bedrock as an internal service.

One package per bounded context, stacked one way (a package imports only those below it):
api/ dataplane/ > slack/ wiring > evaluation/ > training/ > grading/ > inference/ > spend/ >
platform/ > outbox bus cache failures > domain/ store/ adapters/ config. Reactions of a lower
context to a higher one are domain events (domain/events.py) handled through wiring.py.
tests/unit/test_layers.py keeps it so.
"""
