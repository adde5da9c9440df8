"""The one error family of the library: every error Plasma raises derives from ``PlasmaError``.

Each class has a stable, machine-readable ``code`` (the class default, or a finer one given at
the raise, e.g. ``BundleError(..., code="bad_manifest")``); ``str(exc)`` is one actionable line
without the code in front. The command-line tools alone turn a ``PlasmaError`` into a usage
error and an exit status. Wrong arguments from a caller's own code (a bug, not a condition) stay
``ValueError`` / ``TypeError``.

Exception tree::

    PlasmaError                plasma_error
    ├── PacketError            packet_invalid: anything wrong with an instruction packet
    │   ├── PacketTooLarge         too_large: size cap exceeded (checked before reading)
    │   ├── PacketTruncated        truncated: shorter than its own lengths say
    │   ├── PacketBadMagic         bad_magic: not a Plasma packet
    │   ├── PacketUnsupported      unsupported_format: unknown format version
    │   ├── PacketBadLength        bad_length: lengths that do not add up (trailing bytes...)
    │   ├── SignatureMissing       signature_missing: no signature entries
    │   ├── SignatureDuplicate     signature_duplicate: the same key signed twice
    │   ├── SignatureUnknownKey    unknown_key: no trusted key among the signers
    │   ├── SignatureInvalid       bad_signature: a trusted key's signature does not verify
    │   ├── PayloadDigestMismatch  digest_mismatch: payload bytes differ from the signed digest
    │   ├── HeaderInvalid          bad_header: header is not a valid InstructionPacket
    │   └── PayloadInvalid         bad_payload: factor bytes malformed or not finite
    ├── TelemetryError         bad_telemetry: a telemetry frame that cannot be decoded
    ├── MessageInvalid         bad_message: a wire message (msgspec mirror) breaking the contract
    ├── TopicError             bad_topic: a topic or id outside the allowed grammar
    ├── KeyFileError           bad_key_file: a key file missing, malformed or readable by others
    ├── AdapterFileError       bad_adapter_file: an adapter npz that does not hold a LoRA adapter
    ├── BundleError            bad_bundle: a model bundle that cannot be used (missing_file,
    │                              bad_manifest, bad_weights, digest_mismatch, bad_model,
    │                              base_mismatch)
    │   └── BundleNotFound         no_bundle: no bundle of that name, task or physics among the
    │                                  shipped ones and the user's directories (plasma.protocol.catalog)
    ├── ConfigError            bad_config: configuration (flags, environment, TOML) that does
    │                              not make a valid daemon or server
    ├── BusError               bus_error: the broker seam (bad URL, connection, subscription)
    ├── EnvError               bad_env: an --env value that names no usable environment
    ├── MergeError             merge_error: an adapter or handle the merge cannot use
    │                              (bad_adapter, non_finite, stale, no_rollback)
    ├── JournalError           state_write_failed: the device's state directory cannot be written
    ├── StoreError             store_error: the server's trace store cannot be opened or used
    └── ServiceError           service_error: a server or daemon that cannot start as configured
                                   (metrics port taken, model and task disagree...)

Rejections that are *decisions* (expired, replayed, wrong base model...) are not
exceptions: they are ``Reason`` values inside an ``AuditRecord``.
"""

from __future__ import annotations

__all__ = [
    "PlasmaError", "PacketError", "PacketTooLarge", "PacketTruncated", "PacketBadMagic",
    "PacketUnsupported", "PacketBadLength", "SignatureMissing", "SignatureDuplicate",
    "SignatureUnknownKey", "SignatureInvalid", "PayloadDigestMismatch", "HeaderInvalid",
    "PayloadInvalid", "TelemetryError", "MessageInvalid", "TopicError", "KeyFileError",
    "AdapterFileError", "BundleError", "BundleNotFound", "ConfigError", "BusError", "EnvError", "MergeError",
    "JournalError", "StoreError", "ServiceError",
]


class PlasmaError(Exception):
    """Base of every Plasma error; ``code`` is stable and machine-readable."""

    code = "plasma_error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else self.code


class PacketError(PlasmaError):
    code = "packet_invalid"


class PacketTooLarge(PacketError):
    code = "too_large"


class PacketTruncated(PacketError):
    code = "truncated"


class PacketBadMagic(PacketError):
    code = "bad_magic"


class PacketUnsupported(PacketError):
    code = "unsupported_format"


class PacketBadLength(PacketError):
    code = "bad_length"


class SignatureMissing(PacketError):
    code = "signature_missing"


class SignatureDuplicate(PacketError):
    code = "signature_duplicate"


class SignatureUnknownKey(PacketError):
    code = "unknown_key"


class SignatureInvalid(PacketError):
    code = "bad_signature"


class PayloadDigestMismatch(PacketError):
    code = "digest_mismatch"


class HeaderInvalid(PacketError):
    code = "bad_header"


class PayloadInvalid(PacketError):
    code = "bad_payload"


class TelemetryError(PlasmaError):
    code = "bad_telemetry"


class TopicError(PlasmaError, ValueError):
    code = "bad_topic"


class KeyFileError(PlasmaError):
    code = "bad_key_file"


class AdapterFileError(PlasmaError):
    code = "bad_adapter_file"


class MessageInvalid(PlasmaError, ValueError):
    """A wire message (``plasma.protocol.wire``) that does not satisfy the contract.

    ``field`` is the dotted path of the first offending field ("" for the whole message);
    ``detail`` what is wrong with it, without the message and field names in front.
    """

    code = "bad_message"

    def __init__(self, message: str, *, field: str = "", detail: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.field = field
        self.detail = message if detail is None else detail


class BundleError(PlasmaError, ValueError):
    """A bundle that cannot be used; ``code`` says which part (see the tree above)."""

    code = "bad_bundle"


class BundleNotFound(BundleError):
    """No bundle answers a lookup (a name, or a task and physics) in the directories searched.

    The message says what was looked for and where; it names no flag or argument, so each caller
    adds its own way out (``policy=`` in the library, ``--model`` / ``--models-dir`` in a CLI).
    """

    code = "no_bundle"


class ConfigError(PlasmaError, ValueError):
    code = "bad_config"


class BusError(PlasmaError):
    code = "bus_error"


class EnvError(PlasmaError):
    code = "bad_env"


class MergeError(PlasmaError, ValueError):
    """An adapter or handle the merge cannot use; ``code``: bad_adapter, non_finite, stale, no_rollback."""

    code = "merge_error"


class JournalError(PlasmaError):
    code = "state_write_failed"


class StoreError(PlasmaError):
    code = "store_error"


class ServiceError(PlasmaError):
    code = "service_error"
