"""API keys: generated once, shown once, stored as a sha256 hash."""

import hashlib
import secrets

KEY_PREFIX = "tf_"
# Characters of a key stored in clear to name it (`keys list`, `keys revoke`): "tf_" and 9 random characters
# (54 bits), practically unique.
PREFIX_LENGTH = 12


def generate_api_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_api_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()
