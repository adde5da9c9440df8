"""Protocol errors: one family, each class with a stable ``code``.

Exception tree::

    PlasmaError
    ├── PacketError            anything wrong with an instruction packet
    │   ├── PacketTooLarge         size cap exceeded (checked before reading)
    │   ├── PacketTruncated        shorter than its own lengths say
    │   ├── PacketBadMagic         not a Plasma packet
    │   ├── PacketUnsupported      unknown format version
    │   ├── PacketBadLength        lengths that do not add up (trailing bytes...)
    │   ├── SignatureMissing       no signature entries
    │   ├── SignatureDuplicate     the same key signed twice
    │   ├── SignatureUnknownKey    no trusted key among the signers
    │   ├── SignatureInvalid       a trusted key's signature does not verify
    │   ├── PayloadDigestMismatch  payload bytes differ from the signed digest
    │   ├── HeaderInvalid          header is not a valid InstructionPacket
    │   └── PayloadInvalid         factor bytes malformed or not finite
    ├── TelemetryError         a telemetry frame that cannot be decoded
    ├── MessageInvalid         a wire message (msgspec mirror of a model) breaking the contract
    ├── TopicError             a topic or id outside the allowed grammar
    ├── KeyFileError           a key file missing, malformed or readable by others
    └── AdapterFileError       an adapter npz that does not hold a LoRA adapter

Rejections that are *decisions* (expired, replayed, wrong base model...) are not
exceptions: they are ``Reason`` values inside an ``AuditRecord``.
"""

from __future__ import annotations


class PlasmaError(Exception):
    """Base of every Plasma protocol error; ``code`` is stable and machine-readable."""

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
