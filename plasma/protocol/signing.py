"""Ed25519 signing keys, key ids and the device's trust store.

A key directory holds ``signing.key`` (PKCS#8 PEM, mode 0600) and ``signing.pub``
(SubjectPublicKeyInfo PEM).  A trust store is a directory of ``*.pub`` files; a key
directory is therefore also a valid trust store for its own public key.

Two libraries, one per side. Signing (the server: ``SigningKey``) uses ``cryptography``,
imported only when a private key is made or loaded. Verifying (the device: ``TrustStore``,
``load_public_key``) uses PyNaCl (libsodium): measured on this machine, importing
``cryptography``'s Ed25519 costs 7.1 MB of RSS, PyNaCl 1.3 MB, out of the daemon's 80 MB
budget. An Ed25519 SubjectPublicKeyInfo is a fixed 12-byte DER prefix and the 32-byte key
(RFC 8410), so reading a PEM public key needs no ASN.1 library. libsodium's verify is the
stricter of the two (it refuses small-order keys and non-canonical signatures); the tests
sign with ``cryptography`` and verify with PyNaCl.

The device calls libsodium's ``crypto_sign_open`` through PyNaCl's own cffi binding
(``nacl._sodium``), exactly what ``nacl.signing.VerifyKey.verify`` calls: importing
``nacl.signing`` loads every binding PyNaCl has (box, AEAD, pwhash, secretstream...), 23 modules
and 0.6 MiB of the daemon's resident memory for one function. A PyNaCl without that module
falls back to ``VerifyKey``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import stat
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

from .errors import KeyFileError

__all__ = ["KEY_ID_BYTES", "key_id_of", "KeyLike", "load_public_key", "MAX_KEY_FILE",
           "PRIVATE_NAME", "PUBLIC_NAME", "PublicKey", "RAW_KEY_BYTES", "SIGNATURE_BYTES",
           "SigningKey", "TrustStore"]

if TYPE_CHECKING:  # the device never imports cryptography
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (
        Ed25519PrivateKey,
        Ed25519PublicKey,
    )

PRIVATE_NAME = "signing.key"
PUBLIC_NAME = "signing.pub"
KEY_ID_BYTES = 16
MAX_KEY_FILE = 4096
RAW_KEY_BYTES = 32
SIGNATURE_BYTES = 64
_SPKI_PREFIX = bytes.fromhex("302a300506032b6570032100")  # SEQ{SEQ{OID 1.3.101.112}, BIT STRING}
_PEM_BEGIN, _PEM_END = b"-----BEGIN PUBLIC KEY-----", b"-----END PUBLIC KEY-----"


def _sodium_open() -> Any:
    """libsodium's ``crypto_sign_open`` verifier: (raw key, signature, data) -> bool."""
    try:
        from nacl._sodium import ffi, lib  # type: ignore[import-not-found,unused-ignore]
    except ImportError:  # pragma: no cover - a PyNaCl without its cffi module's usual name
        from nacl.exceptions import BadSignatureError
        from nacl.signing import VerifyKey

        def verify_key(raw: bytes, signature: bytes, data: bytes) -> bool:
            try:
                VerifyKey(raw).verify(data, signature)
            except BadSignatureError:
                return False
            return True
        return verify_key

    def init() -> None:
        if lib.sodium_init() == -1:
            raise RuntimeError("could not initialize libsodium")

    ffi.init_once(init, "libsodium")  # PyNaCl's own once-key: never initialised twice

    def sodium_open(raw: bytes, signature: bytes, data: bytes) -> bool:
        signed = signature + data  # what VerifyKey.verify hands to crypto_sign_open
        message = ffi.new("unsigned char[]", len(signed))
        message_len = ffi.new("unsigned long long *")
        return bool(lib.crypto_sign_open(message, message_len, signed, len(signed), raw) == 0)
    return sodium_open


_open = _sodium_open()


class PublicKey:
    """A raw Ed25519 public key (32 bytes) and its key id; verifies with libsodium."""

    __slots__ = ("raw", "key_id")

    def __init__(self, raw: bytes) -> None:
        if len(raw) != RAW_KEY_BYTES:
            raise ValueError(f"an Ed25519 public key is {RAW_KEY_BYTES} bytes, got {len(raw)}")
        self.raw = bytes(raw)
        self.key_id = hashlib.sha256(self.raw).digest()[:KEY_ID_BYTES].hex()

    def verify(self, signature: bytes, data: bytes) -> bool:
        if len(signature) != SIGNATURE_BYTES:
            return False
        return bool(_open(self.raw, bytes(signature), bytes(data)))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PublicKey) and other.raw == self.raw

    def __hash__(self) -> int:
        return hash(self.raw)

    def __repr__(self) -> str:
        return f"PublicKey(key_id={self.key_id})"


KeyLike = Union[PublicKey, bytes, "Ed25519PublicKey"]


def _public(key: KeyLike) -> PublicKey:
    """A PublicKey from itself, 32 raw bytes, or a ``cryptography`` Ed25519PublicKey."""
    if isinstance(key, PublicKey):
        return key
    if isinstance(key, (bytes, bytearray)):
        return PublicKey(bytes(key))
    raw_of: Any = getattr(key, "public_bytes_raw", None)  # cryptography >= 40
    if raw_of is None:
        raise TypeError(f"not an Ed25519 public key: {type(key).__name__}")
    return PublicKey(raw_of())


def key_id_of(public_key: KeyLike) -> str:
    """32 hex digits: the first 16 bytes of sha256 over the raw public key."""
    return _public(public_key).key_id


class SigningKey:
    """A private Ed25519 key with its key id (server side: uses ``cryptography``)."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._key = private_key
        self.public_key = private_key.public_key()
        """The ``cryptography`` public key; ``TrustStore`` and ``key_id_of`` accept it."""
        self.key_id = key_id_of(self.public_key)

    @classmethod
    def generate(cls) -> SigningKey:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        return cls(Ed25519PrivateKey.generate())

    def sign(self, data: bytes) -> bytes:
        return self._key.sign(data)

    def public_pem(self) -> bytes:
        from cryptography.hazmat.primitives import serialization

        return self.public_key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def save(self, directory: str | Path, *, overwrite: bool = False) -> tuple[Path, Path]:
        """Write ``signing.key`` (0600, never world- or group-readable) and ``signing.pub``."""
        directory = Path(directory)
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        private_path, public_path = directory / PRIVATE_NAME, directory / PUBLIC_NAME
        if not overwrite and (private_path.exists() or public_path.exists()):
            raise KeyFileError(f"{directory} already holds a key; refusing to overwrite it")
        from cryptography.hazmat.primitives import serialization

        pem = self._key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        _write_private(private_path, pem)
        public_path.write_bytes(self.public_pem())
        return private_path, public_path

    @classmethod
    def load(cls, directory: str | Path) -> SigningKey:
        """Load ``DIR/signing.key`` (or a key file path); refuses files others can read."""
        path = Path(directory)
        if path.is_dir():
            path = path / PRIVATE_NAME
        data = _read_small(path)
        mode = path.stat().st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise KeyFileError(
                f"{path} is readable by group or others (mode {oct(mode & 0o777)}); "
                f"run: chmod 600 {path}"
            )
        from cryptography.exceptions import UnsupportedAlgorithm
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            raise KeyFileError(f"{path}: not an unencrypted PEM private key ({exc})") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise KeyFileError(f"{path}: not an Ed25519 key")
        return cls(key)


def _write_private(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # umask cannot widen it, an existing tmp file cannot either
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _read_small(path: Path) -> bytes:
    try:
        with path.open("rb") as fh:
            data = fh.read(MAX_KEY_FILE + 1)
    except OSError as exc:
        raise KeyFileError(f"cannot read key file {path}: {exc.strerror or exc}") from None
    if len(data) > MAX_KEY_FILE:
        raise KeyFileError(f"{path}: larger than {MAX_KEY_FILE} bytes, not a key file")
    return data


def load_public_key(path: str | Path) -> PublicKey:
    """A public key from a PEM (SubjectPublicKeyInfo) file or a file of 64 hex digits of the raw key."""
    path = Path(path)
    text = _read_small(path).strip()
    if text.startswith(b"-----BEGIN"):
        raw = _pem_public_raw(path, text)
    else:
        try:
            raw = bytes.fromhex(text.decode("ascii"))
        except (ValueError, UnicodeDecodeError):
            raise KeyFileError(f"{path}: not an Ed25519 public key (neither PEM nor 64 hex "
                               "digits)") from None
        if len(raw) != RAW_KEY_BYTES:
            raise KeyFileError(f"{path}: not an Ed25519 public key ({len(raw)} bytes of hex, "
                               f"want {RAW_KEY_BYTES})")
    return PublicKey(raw)


def _pem_public_raw(path: Path, text: bytes) -> bytes:
    lines = text.splitlines()
    if lines[0].strip() != _PEM_BEGIN or lines[-1].strip() != _PEM_END:
        raise KeyFileError(f"{path}: not an Ed25519 public key (want one PEM block "
                           "'BEGIN PUBLIC KEY')")
    try:
        der = base64.b64decode(b"".join(line.strip() for line in lines[1:-1]), validate=True)
    except (binascii.Error, ValueError):
        raise KeyFileError(f"{path}: not an Ed25519 public key (bad base64)") from None
    if len(der) != len(_SPKI_PREFIX) + RAW_KEY_BYTES or not der.startswith(_SPKI_PREFIX):
        raise KeyFileError(f"{path}: not an Ed25519 public key (another algorithm, or damaged)")
    return der[len(_SPKI_PREFIX):]


class TrustStore:
    """The public keys a device accepts packets from, by key id."""

    def __init__(self, keys: Iterable[KeyLike] = ()) -> None:
        self._keys: dict[str, PublicKey] = {k.key_id: k for k in map(_public, keys)}

    @classmethod
    def from_dir(cls, directory: str | Path) -> TrustStore:
        """Every ``*.pub`` file in the directory; an empty or missing store is an error."""
        directory = Path(directory)
        if not directory.is_dir():
            raise KeyFileError(f"trust store {directory} is not a directory")
        keys = [load_public_key(p) for p in sorted(directory.glob("*.pub"))]
        if not keys:
            raise KeyFileError(f"trust store {directory} holds no *.pub key")
        return cls(keys)

    @property
    def keys(self) -> Mapping[str, PublicKey]:
        return dict(self._keys)

    def __contains__(self, key_id: object) -> bool:
        return key_id in self._keys

    def __len__(self) -> int:
        return len(self._keys)

    def verify(self, key_id: str, signature: bytes, data: bytes) -> bool | None:
        """True if valid, False if invalid, None if the key is not trusted."""
        key = self._keys.get(key_id)
        if key is None:
            return None
        return key.verify(signature, data)
