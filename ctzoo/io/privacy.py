"""Patient identifiers in the only form ctzoo stores them: salted SHA-256 (the PACS ledger, the cohort table)."""

from __future__ import annotations

import hashlib
import os
import secrets
from pathlib import Path


def patient_hash(patient_id: str, salt: str | bytes) -> str:
    """Salted SHA-256 hex digest of a patient id (or any identifier); the only form in which one is kept."""
    if not salt:
        raise ValueError("a non-empty salt is required")
    salt_b = salt.encode() if isinstance(salt, str) else salt
    return hashlib.sha256(salt_b + b"\x1f" + patient_id.encode()).hexdigest()


def salt_from(variable: str, folder: Path) -> str:
    """``$variable`` when set (several tables or replicas then hash alike), else ``folder/salt``, created once with
    32 random bytes and mode 0600."""
    if os.environ.get(variable):
        return os.environ[variable]
    path = folder / "salt"
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        try:  # O_EXCL: of two processes starting together, one writes the salt and both read it
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass
        else:
            with os.fdopen(descriptor, "w") as handle:
                handle.write(secrets.token_hex(32))
    return path.read_text(encoding="utf-8").strip()
