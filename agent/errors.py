"""Errors raised by the agent layer, and the map from any error to a stable reason code.

    AgentError                        reason
    ├── ConfigError                   config_invalid
    │                             ├── ConfigFileError     config_unreadable
    │                             └── ConfigValidationErrorconfig_invalid
    ├── CredentialError           credential_missing      secret not in credentials / file
    ├── PinningError              pinning_invalid         CPU outside the allowed set, bad NUMA node
    │   └── NumaUnavailableError  numa_unavailable        libnuma / kernel NUMA missing (a warning)
    ├── StateDirError             state_dir_unusable      state directory missing / not writable
    ├── StartupError              startup_failed          a start step failed (wraps the cause)
    └── ReportingError            reporting_failed        a reporter could not start / publish
        ├── TopicInvalidError     topic_invalid           topic level empty / wildcard / too long
        ├── OutboxFullError       outbox_full             a critical message did not fit the outbox
        ├── MessageTooLargeError  message_too_large       one message over outbox.max_message_bytes
        ├── OutboxStoreError      outbox_unusable         SQLite outbox cannot be opened / written
        ├── TrustedKeyError       trusted_key_invalid     a trusted command key file is unreadable
        └── HidError              hid_failed              USB HID reporting (gadget or host mode)
            ├── HidDeviceError    hid_device_unavailable  /dev/hidgN or the USB device missing,
            │                                             not writable, or not enumerated
            ├── HidPayloadError   hid_payload_invalid     payload over the protocol limit, a
            │                                             character the keyboard layout lacks
            └── HidFrameError     hid_frame_invalid       a received report fails its version,
                                                          length or CRC check
    BundleError (under AgentError) bundle_invalid          firmware bundles (agent/bundles/)
    ├── BundleFormatError         bundle_malformed        not tar+zstd, truncated, bad manifest
    ├── BundleSignatureError      bundle_signature_invalid unsigned, unknown key, no match
    ├── BundleContentError        bundle_content_invalid  member not in the manifest, size or
    │                                                     sha256 mismatch, more bytes than
    │                                                     declared, path traversal, a link or
    │                                                     device member
    ├── BundleIncompatibleError   bundle_incompatible     wrong board, L4T, TensorRT, Python or
    │                                                     platform; agent older than required
    ├── BundleDowngradeError      bundle_downgrade        not newer than the installed version
    ├── BundleBusyError           busy                    another install holds the lock
    ├── BundleSpaceError          bundle_no_space         the disk filled while writing a slot
    ├── BundleDownloadError       bundle_download_failed  HTTP error, size limit, no progress
    ├── BundleHookError           bundle_hook_failed      a pre-/post-install check failed
    └── BundleHealthError         bundle_health_failed    the new version missed its health
                                                          gate; the previous slot is back

Errors from the lower layers (``engines.errors.EngineError``, ``pipelines.errors.PipelineError``)
keep their own ``reason``; ``reason_code()`` reads it from any of the three trees and maps
everything else to ``internal_error``.
"""

from __future__ import annotations

from typing import ClassVar

from engines.errors import EngineError
from pipelines.errors import PipelineError

__all__ = [
    "AgentError",
    "BundleBusyError",
    "BundleContentError",
    "BundleDowngradeError",
    "BundleDownloadError",
    "BundleError",
    "BundleFormatError",
    "BundleHealthError",
    "BundleHookError",
    "BundleIncompatibleError",
    "BundleSignatureError",
    "BundleSpaceError",
    "ConfigError",
    "ConfigFileError",
    "ConfigValidationError",
    "CredentialError",
    "HidDeviceError",
    "HidError",
    "HidFrameError",
    "HidPayloadError",
    "MessageTooLargeError",
    "NumaUnavailableError",
    "OutboxFullError",
    "OutboxStoreError",
    "PinningError",
    "ReportingError",
    "StartupError",
    "StateDirError",
    "TopicInvalidError",
    "TrustedKeyError",
    "reason_code",
]


class AgentError(Exception):
    """Base of every agent-layer error."""

    reason: ClassVar[str] = "agent_error"


class ConfigError(AgentError):
    reason = "config_invalid"


class ConfigFileError(ConfigError):
    reason = "config_unreadable"


class ConfigValidationError(ConfigError):
    """A config that parsed but does not validate; ``problems`` holds one line per problem."""

    reason = "config_invalid"

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        super().__init__(
            f"{source}: {len(problems)} problem(s): "
            + "; ".join(problems)
            + f" — fix them (`edge-agent config validate {source}` lists each with its line)"
        )


class CredentialError(AgentError):
    reason = "credential_missing"


class PinningError(AgentError):
    """A pinning setting that cannot be applied; ``key`` is the config key it is about.

    With ``key`` the message reads ``"<key>: <detail>"``; ``detail`` is the part after it.
    """

    reason = "pinning_invalid"

    def __init__(self, detail: str, *, key: str | None = None) -> None:
        self.key = key
        self.detail = detail
        super().__init__(f"{key}: {detail}" if key else detail)


class NumaUnavailableError(PinningError):
    """libnuma cannot be loaded or the kernel has no NUMA support; callers report a warning."""

    reason = "numa_unavailable"


class StateDirError(AgentError):
    reason = "state_dir_unusable"


class StartupError(AgentError):
    reason = "startup_failed"


class ReportingError(AgentError):
    reason = "reporting_failed"


class TopicInvalidError(ReportingError):
    reason = "topic_invalid"


class OutboxFullError(ReportingError):
    reason = "outbox_full"


class MessageTooLargeError(ReportingError):
    reason = "message_too_large"


class OutboxStoreError(ReportingError):
    reason = "outbox_unusable"


class TrustedKeyError(ReportingError):
    reason = "trusted_key_invalid"


class HidError(ReportingError):
    reason = "hid_failed"


class HidDeviceError(HidError):
    reason = "hid_device_unavailable"


class HidPayloadError(HidError):
    reason = "hid_payload_invalid"


class HidFrameError(HidError):
    reason = "hid_frame_invalid"


class BundleError(AgentError):
    """A firmware bundle cannot be built, verified, installed or booted."""

    reason = "bundle_invalid"


class BundleFormatError(BundleError):
    reason = "bundle_malformed"


class BundleSignatureError(BundleError):
    reason = "bundle_signature_invalid"


class BundleContentError(BundleError):
    reason = "bundle_content_invalid"


class BundleIncompatibleError(BundleError):
    reason = "bundle_incompatible"


class BundleDowngradeError(BundleError):
    reason = "bundle_downgrade"


class BundleBusyError(BundleError):
    reason = "busy"


class BundleSpaceError(BundleError):
    reason = "bundle_no_space"


class BundleDownloadError(BundleError):
    reason = "bundle_download_failed"


class BundleHookError(BundleError):
    reason = "bundle_hook_failed"


class BundleHealthError(BundleError):
    reason = "bundle_health_failed"


def reason_code(exc: BaseException) -> str:
    """The stable reason code for ``exc``: its own for our three trees, else ``internal_error``."""
    if isinstance(exc, (AgentError, EngineError, PipelineError)):
        return exc.reason
    return "internal_error"
