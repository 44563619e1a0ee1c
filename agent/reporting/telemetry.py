"""System figures for the ``telemetry`` message: RSS, CPU %, load, thermal zones, throttling.

``SystemSampler.sample()`` reads ``/proc`` and ``/sys`` (roots configurable, so tests point
them at prepared trees); the agent calls ``MqttReporter.publish_telemetry`` every N seconds with
the pipelines' own figures (fps, latency percentiles, drops), and the reporter adds these and
the outbox's.

Platform specifics: every ``/sys/class/thermal/thermal_zone*`` with a readable ``temp``
(millidegrees) is reported; a Raspberry Pi's firmware throttling bits come from
``/sys/devices/platform/soc/soc:firmware/get_throttled`` (hex); on a Jetson the thermal zones
carry ``CPU-therm``/``GPU-therm`` types and each zone's exceeded passive/hot trip points are
reported as throttling.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from agent.reporting.messages import SystemTelemetry, ThermalZone

__all__ = ["SystemSampler", "read_thermal_zones", "read_throttling"]

_log = logging.getLogger(__name__)

_RPI_THROTTLE_BITS = {
    0: "under_voltage",
    1: "arm_frequency_capped",
    2: "currently_throttled",
    3: "soft_temperature_limit",
    16: "under_voltage_occurred",
    17: "arm_frequency_capping_occurred",
    18: "throttling_occurred",
    19: "soft_temperature_limit_occurred",
}


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None


def _zone_temps(sys_root: Path) -> list[tuple[Path, str]]:
    """Each ``thermal_zone*`` directory (sorted) with its readable ``temp`` text."""
    try:
        entries = sorted((sys_root / "class" / "thermal").glob("thermal_zone*"))
    except OSError:
        return []
    out: list[tuple[Path, str]] = []
    for zone in entries:
        raw = _read_text(zone / "temp")
        if raw is not None:
            out.append((zone, raw))
    return out


def _thermal_zones(temps: Sequence[tuple[Path, str]]) -> list[ThermalZone]:
    zones: list[ThermalZone] = []
    for zone, raw in temps:
        try:
            temp_c = int(raw) / 1000.0
        except ValueError:
            _log.debug("thermal zone %s: unreadable temp %r", zone, raw)
            continue
        zones.append(
            ThermalZone(name=zone.name, type=_read_text(zone / "type") or "unknown", temp_c=temp_c)
        )
    return zones


def read_thermal_zones(sys_root: Path = Path("/sys")) -> list[ThermalZone]:
    """Every thermal zone with a readable temperature."""
    return _thermal_zones(_zone_temps(sys_root))


def read_throttling(
    sys_root: Path = Path("/sys"), zones: Sequence[tuple[Path, str]] | None = None
) -> dict[str, Any]:
    """Raspberry Pi firmware throttle flags and per-zone exceeded trip points (Jetson and
    others); empty when the platform exposes neither. ``zones``: the thermal zones with their
    ``temp`` text when the caller has read them already (read from ``sys_root`` otherwise)."""
    out: dict[str, Any] = {}
    raw = _read_text(sys_root / "devices/platform/soc/soc:firmware/get_throttled")
    if raw is not None:
        try:
            bits = int(raw, 16)
        except ValueError:
            bits = None
        if bits is not None:
            out["rpi_get_throttled"] = f"0x{bits:x}"
            out["rpi_flags"] = [name for bit, name in _RPI_THROTTLE_BITS.items() if bits >> bit & 1]
    tripped: dict[str, list[str]] = {}
    for zone, temp in _zone_temps(sys_root) if zones is None else zones:
        if not temp.lstrip("-").isdigit():
            continue
        for trip_type_file in sorted(zone.glob("trip_point_*_type")):
            kind = _read_text(trip_type_file)
            limit = _read_text(
                trip_type_file.with_name(trip_type_file.name[: -len("type")] + "temp")
            )
            if (
                kind in ("passive", "hot", "critical")
                and limit
                and limit.lstrip("-").isdigit()
                and int(temp) >= int(limit)
            ):
                tripped.setdefault(zone.name, []).append(kind)
    if tripped:
        out["trip_points_exceeded"] = tripped
    return out


class SystemSampler:
    """Process RSS and CPU % (since the previous sample), load, thermal, throttling."""

    def __init__(
        self,
        *,
        proc_root: Path = Path("/proc"),
        sys_root: Path = Path("/sys"),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._proc = proc_root
        self._sys = sys_root
        self._clock = clock
        self._page = os.sysconf("SC_PAGE_SIZE")
        self._last_cpu = self._cpu_seconds()
        self._last_t = clock()

    def _cpu_seconds(self) -> float:
        t = os.times()
        return t.user + t.system

    def rss_bytes(self) -> int:
        raw = _read_text(self._proc / "self" / "statm")
        if raw is None:
            return 0
        try:
            return int(raw.split()[1]) * self._page
        except (IndexError, ValueError):
            return 0

    def sample(self) -> SystemTelemetry:
        now, cpu = self._clock(), self._cpu_seconds()
        elapsed = now - self._last_t
        percent = 100.0 * (cpu - self._last_cpu) / elapsed if elapsed > 0 else 0.0
        self._last_t, self._last_cpu = now, cpu
        try:
            load = os.getloadavg()[0]
        except OSError:
            load = 0.0
        zones = _zone_temps(self._sys)
        return SystemTelemetry(
            rss_bytes=self.rss_bytes(),
            cpu_percent=round(max(percent, 0.0), 2),
            load_avg_1m=round(load, 3),
            thermal=_thermal_zones(zones),
            throttling=read_throttling(self._sys, zones),
        )
