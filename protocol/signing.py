"""Ed25519 signing keys, key ids and the device's trust store.

A key directory holds ``signing.key`` (PKCS#8 PEM, mode 0600) and ``signing.pub``
(SubjectPublicKeyInfo PEM).  A trust store is a directory of ``*.pub`` files; a key
directory is therefore also a valid trust store for its own public key.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterable, Mapping
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .errors import KeyFileError

PRIVATE_NAME = "signing.key"
PUBLIC_NAME = "signing.pub"
KEY_ID_BYTES = 16
MAX_KEY_FILE = 4096


def key_id_of(public_key: Ed25519PublicKey) -> str:
    """32 hex digits: the first 16 bytes of sha256 over the raw public key."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).digest()[:KEY_ID_BYTES].hex()


class SigningKey:
    """A private Ed25519 key with its key id."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._key = private_key
        self.public_key = private_key.public_key()
        self.key_id = key_id_of(self.public_key)

    @classmethod
    def generate(cls) -> SigningKey:
        return cls(Ed25519PrivateKey.generate())

    def sign(self, data: bytes) -> bytes:
        return self._key.sign(data)

    def public_pem(self) -> bytes:
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


def load_public_key(path: str | Path) -> Ed25519PublicKey:
    """A public key from a PEM file or a file holding 64 hex digits of the raw key."""
    path = Path(path)
    data = _read_small(path)
    text = data.strip()
    try:
        if text.startswith(b"-----BEGIN"):
            key = serialization.load_pem_public_key(data)
        else:
            key = Ed25519PublicKey.from_public_bytes(bytes.fromhex(text.decode("ascii")))
    except (ValueError, TypeError, UnicodeDecodeError, UnsupportedAlgorithm) as exc:
        raise KeyFileError(f"{path}: not an Ed25519 public key ({exc})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(f"{path}: not an Ed25519 public key")
    return key


class TrustStore:
    """The public keys a device accepts packets from, by key id."""

    def __init__(self, keys: Iterable[Ed25519PublicKey] = ()) -> None:
        self._keys: dict[str, Ed25519PublicKey] = {key_id_of(k): k for k in keys}

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
    def keys(self) -> Mapping[str, Ed25519PublicKey]:
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
        try:
            key.verify(signature, data)
        except InvalidSignature:
            return False
        return True
