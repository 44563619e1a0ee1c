"""Home Assistant MQTT discovery: retained sensor configs for the agent and its pipelines.

With ``[reporting.mqtt.home_assistant]`` set, the agent publishes (retained, QoS 1, through the
durable outbox, not stamped) on ``<discovery_prefix>/sensor/<device_id>/<object_id>/config``::

    object_id                     sensor                          value read from
    status                        agent status (online/degraded/  edge/<dev>/status  .state
                                  offline; attributes: the rest)
    <pipeline>_detections         detections in the last frame    vision/<pipeline>/detections
    <pipeline>_<label>_count      that class in the last frame    ... .counts[<label>]

Every sensor belongs to one Home Assistant device (the device_id) and is available while the
retained status is not ``offline``. ``update(pipelines)`` publishes what changed since the last
call and deletes (empty retained payload) the sensors no longer wanted, e.g. after a class
allow-list change or a model swap; the agent calls it when it becomes ready and after each
pipeline/model command. The broker ACL must let the device write
``<discovery_prefix>/sensor/<device_id>/#`` (deploy/mosquitto/acl does for ``homeassistant``).
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Mapping, Sequence

from agent.errors import ReportingError
from agent.mqtt_config import HomeAssistantConfig
from agent.reporting.messages import HaAvailability, HaDevice, HaSensorConfig
from agent.reporting.mqtt import MqttReporter
from agent.reporting.topics import Topics

__all__ = ["HomeAssistantDiscovery", "discovery_configs", "object_id"]

_log = logging.getLogger(__name__)
_SLUG = re.compile(r"[^a-z0-9]+")


def object_id(*parts: str) -> str:
    """A discovery object id: lower-case letters, digits and ``_`` only."""
    return "_".join(_SLUG.sub("_", p.lower()).strip("_") or "x" for p in parts)


def _quoted(text: str) -> str:
    """``text`` as a single-quoted Jinja string literal."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def discovery_configs(
    *,
    device_id: str,
    version: str,
    topics: Topics,
    discovery_prefix: str,
    pipelines: Mapping[str, Sequence[str]],
) -> dict[str, HaSensorConfig]:
    """Discovery topic -> sensor config, for ``pipelines`` (name -> labels to count)."""
    device = HaDevice(
        identifiers=[f"edge-agent-{device_id}"],
        name=device_id,
        manufacturer="edge-agent",
        model="edge-agent",
        sw_version=version,
    )
    available = [
        HaAvailability(
            topic=topics.status,
            value_template="{{ 'offline' if value_json.state == 'offline' else 'online' }}",
        )
    ]

    def topic(oid: str) -> str:
        return f"{discovery_prefix}/sensor/{device_id}/{oid}/config"

    out = {
        topic("status"): HaSensorConfig(
            name="Status",
            unique_id=f"{device_id}_status",
            state_topic=topics.status,
            value_template="{{ value_json.state }}",
            json_attributes_topic=topics.status,
            icon="mdi:chip",
            device=device,
        )
    }
    for name, labels in pipelines.items():
        detections = topics.detections(name)
        oid = object_id(name, "detections")
        out[topic(oid)] = HaSensorConfig(
            name=f"{name} detections",
            unique_id=f"{device_id}_{oid}",
            state_topic=detections,
            value_template="{{ value_json.detections | count }}",
            unit_of_measurement="objects",
            state_class="measurement",
            icon="mdi:cctv",
            availability=available,
            device=device,
        )
        for label in labels:
            oid = object_id(name, label, "count")
            out[topic(oid)] = HaSensorConfig(
                name=f"{name} {label}",
                unique_id=f"{device_id}_{oid}",
                state_topic=detections,
                value_template="{{ value_json.counts.get(" + _quoted(label) + ", 0) }}",
                unit_of_measurement="objects",
                state_class="measurement",
                icon="mdi:counter",
                availability=available,
                device=device,
            )
    return out


class HomeAssistantDiscovery:
    """Keeps the retained discovery configs of one device up to date (see the module
    docstring). Thread-safe."""

    def __init__(
        self,
        reporter: MqttReporter,
        config: HomeAssistantConfig,
        *,
        device_id: str,
        version: str,
    ) -> None:
        self._reporter = reporter
        self.config = config
        self._device_id = device_id
        self._version = version
        self._lock = threading.Lock()
        self._published: dict[str, bytes] = {}

    def labels_for(self, allowlist: Sequence[str] | None, model_labels: Sequence[str]) -> list[str]:
        """The labels that get count sensors for one pipeline (see ``HomeAssistantConfig``)."""
        if self.config.classes is not None:
            unknown = [c for c in self.config.classes if model_labels and c not in model_labels]
            if unknown:
                _log.warning(
                    "home_assistant.classes %s are not labels of the model; no sensor for them",
                    unknown,
                )
            return [c for c in self.config.classes if c not in unknown]
        if allowlist is not None:
            return list(allowlist)
        return list(model_labels)

    def update(self, pipelines: Mapping[str, Sequence[str]]) -> int:
        """Publish the changed configs, delete the stale ones; how many messages were queued."""
        wanted = {
            topic: cfg.model_dump_json(exclude_none=True).encode()
            for topic, cfg in discovery_configs(
                device_id=self._device_id,
                version=self._version,
                topics=self._reporter.topics,
                discovery_prefix=self.config.discovery_prefix,
                pipelines=pipelines,
            ).items()
        }
        sent = 0
        with self._lock:
            try:
                for topic in sorted(set(self._published) - set(wanted)):
                    self._reporter.publish_raw(topic, b"", retain=True)
                    del self._published[topic]
                    sent += 1
                for topic, payload in wanted.items():
                    if self._published.get(topic) != payload:
                        self._reporter.publish_raw(topic, payload, retain=True)
                        self._published[topic] = payload
                        sent += 1
            except ReportingError as exc:
                _log.warning("Home Assistant discovery not (fully) published: %s", exc)
        if sent:
            _log.info("Home Assistant discovery: %d config message(s) queued", sent)
        return sent
