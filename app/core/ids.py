"""Public ids: a type prefix and 24 random hex characters (`ftjob-3f9a…`)."""

import secrets


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"
