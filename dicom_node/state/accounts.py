"""Who may use the HTTP surface: users with passwords, and API tokens for scripts.

Passwords are hashed with argon2id (argon2-cffi's defaults, which follow RFC 9106); a token is
shown once, when it is made, and only its SHA-256 is kept. Roles are ordered: a viewer reads,
an operator also retries, reruns, cancels and re-sends, an admin also reads the configuration.
"""

from __future__ import annotations

import functools
import hashlib
import secrets
import threading
from dataclasses import dataclass

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import Engine, delete, select, update

from dicom_node.state import db

ROLES = ("viewer", "operator", "admin")
TOKEN_PREFIX = "dn_"
# argon2id with argon2-cffi's defaults takes 64 MiB and about a tenth of a second per hash, on
# purpose; so many at once, and no more, whatever number of logins arrive together.
CONCURRENT_HASHES = 2
_hasher = PasswordHasher()
_hashing = threading.BoundedSemaphore(CONCURRENT_HASHES)


@dataclass(frozen=True)
class Account:
    """An authenticated caller: a user's or a token's name, and its role."""

    name: str
    role: str

    def may(self, role: str) -> bool:
        return ROLES.index(self.role) >= ROLES.index(role)


def _check_role(role: str) -> None:
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}: one of {', '.join(ROLES)}")


def add_user(engine: Engine, name: str, role: str, password: str) -> bool:
    """Create the user, or give an existing one this role and password; True if created."""
    _check_role(role)
    if not name or len(name) > 64:
        raise ValueError("a user name has 1 to 64 characters")
    if len(password) < 8:
        raise ValueError("a password has at least 8 characters")
    with _hashing:
        digest = _hasher.hash(password)
    with engine.begin() as connection:
        changed = connection.execute(
            update(db.users).where(db.users.c.name == name).values(role=role, password_hash=digest)).rowcount
        if not changed:
            connection.execute(db.users.insert().values(name=name, role=role, password_hash=digest,
                                                        created_at=db.now()))
    return not changed


def remove_user(engine: Engine, name: str) -> bool:
    with engine.begin() as connection:
        return connection.execute(delete(db.users).where(db.users.c.name == name)).rowcount > 0


def check_password(engine: Engine, name: str, password: str) -> Account | None:
    """The user, if the password is theirs. An unknown name costs a hash too, so that the time
    of an answer does not tell which names exist."""
    with db.reading(engine) as connection:
        row = connection.execute(select(db.users).where(db.users.c.name == name)).mappings().first()
    try:
        with _hashing:
            if row is None:
                _hasher.verify(_unknown_user_hash(), password)
                return None
            _hasher.verify(row["password_hash"], password)
    except (VerificationError, InvalidHashError):
        return None
    return Account(row["name"], row["role"])


def user(engine: Engine, name: str) -> Account | None:
    with db.reading(engine) as connection:
        row = connection.execute(select(db.users.c.name, db.users.c.role).where(db.users.c.name == name)).first()
    return None if row is None else Account(row.name, row.role)


def create_token(engine: Engine, name: str, role: str) -> str:
    """A new API token for ``name``; the only time its text exists outside the caller."""
    _check_role(role)
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    with engine.begin() as connection:
        connection.execute(db.api_tokens.insert().values(
            name=name, role=role, token_sha256=_token_digest(token), created_at=db.now()))
    return token


def check_token(engine: Engine, token: str) -> Account | None:
    with db.reading(engine) as connection:
        row = connection.execute(select(db.api_tokens.c.name, db.api_tokens.c.role)
                                 .where(db.api_tokens.c.token_sha256 == _token_digest(token))).first()
    return None if row is None else Account(f"token {row.name}", row.role)


def any_account(engine: Engine) -> bool:
    with db.reading(engine) as connection:
        return (connection.execute(select(db.users.c.name).limit(1)).first() is not None
                or connection.execute(select(db.api_tokens.c.id).limit(1)).first() is not None)


def _token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@functools.cache
def _unknown_user_hash() -> str:
    """A hash to verify against for a name that is no user's: made once, when first needed."""
    return _hasher.hash(secrets.token_hex(16))
