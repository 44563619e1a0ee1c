"""Commands arriving over MQTT (``cmd/{command}``): envelope validation, Ed25519 signatures,
replay protection, per-class rate limits, an append-only audit log, and a registry of handlers
the agent fills (``status.get`` and ``config.get`` are built in; the agent adds
``pipeline.*``, ``model.*``, ``agent.restart``, ...).

Every command gets exactly one terminal reply (succeeded | failed | rejected | expired | busy)
with a stable reason code; see ``agent.commands.dispatcher`` for the decision order.
"""
