"""Signing keys on disk, key ids and the device's trust store."""

from __future__ import annotations

import hashlib
import os
import re
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from plasma.protocol import KeyFileError, SigningKey, TrustStore, key_id_of, load_public_key
from plasma.protocol import signing as signing_mod


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def raw_hex(key: SigningKey) -> str:
    return key.public_key.public_bytes(serialization.Encoding.Raw,
                                       serialization.PublicFormat.Raw).hex()


@pytest.fixture
def saved(tmp_path: Path) -> tuple[SigningKey, Path]:
    key = SigningKey.generate()
    key.save(tmp_path / "keys")
    return key, tmp_path / "keys"


def test_save_writes_private_0600_in_a_0700_directory(saved: tuple[SigningKey, Path]) -> None:
    key, directory = saved
    assert mode(directory) == 0o700
    assert mode(directory / "signing.key") == 0o600
    assert (directory / "signing.pub").read_bytes() == key.public_pem()
    assert not list(directory.glob("*.tmp"))


@pytest.mark.parametrize("umask", [0o000, 0o022, 0o077])
def test_private_key_mode_does_not_depend_on_umask(tmp_path: Path, umask: int) -> None:
    old = os.umask(umask)
    try:
        SigningKey.generate().save(tmp_path / "k")
    finally:
        os.umask(old)
    assert mode(tmp_path / "k" / "signing.key") == 0o600
    assert mode(tmp_path / "k") & 0o077 == 0


def test_save_refuses_to_overwrite_unless_told(saved: tuple[SigningKey, Path]) -> None:
    key, directory = saved
    with pytest.raises(KeyFileError):
        SigningKey.generate().save(directory)
    assert SigningKey.load(directory).key_id == key.key_id
    new = SigningKey.generate()
    new.save(directory, overwrite=True)
    assert SigningKey.load(directory).key_id == new.key_id
    assert mode(directory / "signing.key") == 0o600


def test_load_round_trips_and_signs_the_same(saved: tuple[SigningKey, Path]) -> None:
    key, directory = saved
    for where in (directory, directory / "signing.key", str(directory)):
        loaded = SigningKey.load(where)
        assert loaded.key_id == key.key_id
        key.public_key.verify(loaded.sign(b"data"), b"data")


@pytest.mark.parametrize("bad_mode", [0o644, 0o640, 0o604, 0o660, 0o670, 0o601, 0o610, 0o777])
def test_load_refuses_a_key_others_can_touch(saved: tuple[SigningKey, Path],
                                             bad_mode: int) -> None:
    _, directory = saved
    (directory / "signing.key").chmod(bad_mode)
    with pytest.raises(KeyFileError, match="chmod 600"):
        SigningKey.load(directory)


def test_load_accepts_0400(saved: tuple[SigningKey, Path]) -> None:
    key, directory = saved
    (directory / "signing.key").chmod(0o400)
    assert SigningKey.load(directory).key_id == key.key_id


@pytest.mark.parametrize("content", [
    b"", b"not a key", b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    b"x" * (signing_mod.MAX_KEY_FILE + 1),
])
def test_load_refuses_malformed_key_files(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "signing.key"
    path.write_bytes(content)
    path.chmod(0o600)
    with pytest.raises(KeyFileError):
        SigningKey.load(path)


def test_load_refuses_other_key_types_and_missing_files(tmp_path: Path) -> None:
    ec_pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption())
    path = tmp_path / "ec.key"
    path.write_bytes(ec_pem)
    path.chmod(0o600)
    with pytest.raises(KeyFileError, match="Ed25519"):
        SigningKey.load(path)
    with pytest.raises(KeyFileError):
        SigningKey.load(tmp_path / "missing")
    with pytest.raises(KeyFileError):
        SigningKey.load(tmp_path)  # a directory without signing.key


def test_key_id_is_32_hex_and_stable(saved: tuple[SigningKey, Path]) -> None:
    key, directory = saved
    assert re.fullmatch(r"[0-9a-f]{32}", key.key_id)
    assert key_id_of(key.public_key) == key.key_id
    assert key_id_of(load_public_key(directory / "signing.pub")) == key.key_id
    assert SigningKey.load(directory).key_id == key.key_id
    assert SigningKey.generate().key_id != key.key_id


def test_key_id_is_sha256_of_the_raw_public_key() -> None:
    """Pinned: a fixed key has a fixed id (devices store ids, so this must never change)."""
    raw = bytes(range(32))
    private = Ed25519PrivateKey.from_private_bytes(raw)
    public = private.public_key().public_bytes(serialization.Encoding.Raw,
                                               serialization.PublicFormat.Raw)
    assert SigningKey(private).key_id == hashlib.sha256(public).hexdigest()[:32]
    assert SigningKey(private).key_id == SigningKey(
        Ed25519PrivateKey.from_private_bytes(raw)).key_id


def test_trust_store_from_dir_loads_pem_and_raw_hex(tmp_path: Path) -> None:
    pem_key, hex_key, other = SigningKey.generate(), SigningKey.generate(), SigningKey.generate()
    (tmp_path / "a.pub").write_bytes(pem_key.public_pem())
    (tmp_path / "b.pub").write_text(raw_hex(hex_key) + "\n")
    (tmp_path / "c.pub.disabled").write_bytes(other.public_pem())  # not *.pub
    (tmp_path / "notes.txt").write_text("ignored")
    store = TrustStore.from_dir(tmp_path)
    assert len(store) == 2
    assert pem_key.key_id in store and hex_key.key_id in store and other.key_id not in store
    assert set(store.keys) == {pem_key.key_id, hex_key.key_id}
    assert store.verify(hex_key.key_id, hex_key.sign(b"m"), b"m") is True
    assert store.verify(hex_key.key_id, hex_key.sign(b"m"), b"n") is False
    assert store.verify(other.key_id, other.sign(b"m"), b"m") is None


def test_a_key_directory_is_a_trust_store(saved: tuple[SigningKey, Path]) -> None:
    key, directory = saved
    assert list(TrustStore.from_dir(directory).keys) == [key.key_id]


def test_trust_store_refuses_empty_or_missing_dir(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError):
        TrustStore.from_dir(tmp_path)
    with pytest.raises(KeyFileError):
        TrustStore.from_dir(tmp_path / "missing")
    (tmp_path / "file.pub").write_text("x")
    with pytest.raises(KeyFileError):
        TrustStore.from_dir(tmp_path / "file.pub")  # a file, not a directory


@pytest.mark.parametrize("content", [
    b"", b"zz" * 32, b"ab" * 31, b"ab" * 33, b"\xff" * 64,
    b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n",
])
def test_trust_store_refuses_a_bad_pub_file(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "good.pub").write_bytes(SigningKey.generate().public_pem())
    (tmp_path / "bad.pub").write_bytes(content)
    with pytest.raises(KeyFileError):
        TrustStore.from_dir(tmp_path)


def test_trust_store_refuses_a_non_ed25519_public_key(tmp_path: Path) -> None:
    pem = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    (tmp_path / "ec.pub").write_bytes(pem)
    with pytest.raises(KeyFileError, match="Ed25519"):
        TrustStore.from_dir(tmp_path)


def test_pynacl_verifies_what_cryptography_signs_and_reads_its_pem(tmp_path: Path) -> None:
    """The device (PyNaCl) and the server (cryptography) agree on keys, ids and signatures."""
    key = SigningKey.generate()
    (tmp_path / "k.pub").write_bytes(key.public_pem())
    loaded = load_public_key(tmp_path / "k.pub")
    assert loaded.raw.hex() == raw_hex(key)
    assert loaded.key_id == key.key_id == key_id_of(key.public_key) == key_id_of(loaded.raw)
    store = TrustStore([loaded])
    data = os.urandom(1000)
    sig = key.sign(data)
    assert store.verify(key.key_id, sig, data) is True
    for bad_sig in (sig[:-1], sig + b"\0", bytes(64), bytes([sig[0] ^ 1]) + sig[1:]):
        assert store.verify(key.key_id, bad_sig, data) is False
    assert store.verify(key.key_id, sig, data + b"x") is False


def test_pem_public_key_reader_refuses_damage(tmp_path: Path) -> None:
    pem = SigningKey.generate().public_pem()
    lines = pem.splitlines()
    body = b"".join(lines[1:-1])
    cases = {
        "bad base64": lines[0] + b"\n" + body[:-2] + b"!!\n" + lines[-1],
        "wrong block": pem.replace(b"PUBLIC KEY", b"CERTIFICATE"),
        "truncated": lines[0] + b"\n" + body[:40] + b"\n" + lines[-1],
    }
    for name, content in cases.items():
        path = tmp_path / f"{name}.pub"
        path.write_bytes(content)
        with pytest.raises(KeyFileError, match="Ed25519"):
            load_public_key(path)


def test_device_verifier_agrees_with_pynacl_verifykey() -> None:
    """The device calls libsodium's crypto_sign_open directly (plasma.protocol.signing): it
    accepts and refuses exactly what PyNaCl's VerifyKey does, with a memoryview too."""
    from nacl.exceptions import BadSignatureError
    from nacl.signing import VerifyKey

    key = SigningKey.generate()
    raw = key.public_key.public_bytes_raw()
    small_order = bytes(32)  # the identity point: libsodium refuses it
    data = os.urandom(7_500)
    sig = key.sign(data)
    cases = [(raw, sig, data), (raw, sig, data[:-1]), (raw, bytes([sig[0] ^ 1]) + sig[1:], data),
             (raw, bytes(64), data), (small_order, sig, data), (raw, sig, b"")]
    for pub, signature, message in cases:
        try:
            VerifyKey(pub).verify(message, signature)
            expected = True
        except BadSignatureError:
            expected = False
        store = TrustStore([pub])
        kid = key_id_of(pub)
        assert store.verify(kid, signature, message) is expected
        assert store.verify(kid, signature, memoryview(message)) is expected
    assert TrustStore([raw]).verify(key.key_id, sig, data) is True
