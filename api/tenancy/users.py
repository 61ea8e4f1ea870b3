"""People: sign-up and password login (argon2id hashes), lookups by id and email.

Emails are stored lower-cased (the table's CHECK refuses anything else) so lookups and uniqueness are
case-insensitive. A failed login costs the same argon2 verification whether or not the email exists, so
response time does not reveal which emails have accounts."""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import Connection, text
from sqlalchemy.exc import IntegrityError

from api.errors import ApiError, Conflict, Unauthorized

_HASHER = PasswordHasher()
_DUMMY_HASH = _HASHER.hash("meterline-timing-equaliser")
_EMAIL = re.compile(r"^[^@\s]{1,64}@[^@\s]{1,255}\.[^@\s]{1,63}$")
PASSWORD_LEN_MIN = 10


class EmailTaken(Conflict):
    code = "api.email_taken"


class WeakPassword(ApiError):
    status = 422
    code = "api.weak_password"


class InvalidEmail(ApiError):
    status = 422
    code = "api.invalid_email"


@dataclass(frozen=True, slots=True)
class User:
    id: str
    email: str
    display_name: str | None
    created_at: datetime

    @classmethod
    def from_mapping(cls, row: Any) -> User:
        return cls(row["id"], row["email"], row["display_name"], row["created_at"])


def normalize_email(email: str) -> str:
    value = email.strip().lower()
    if not _EMAIL.match(value):
        raise InvalidEmail("that is not an email address")
    return value


def hash_password(password: str) -> str:
    if len(password) < PASSWORD_LEN_MIN:
        raise WeakPassword(f"passwords need at least {PASSWORD_LEN_MIN} characters")
    return _HASHER.hash(password)


def create_user(conn: Connection, *, email: str, password: str, display_name: str | None = None) -> User:
    address = normalize_email(email)
    password_hash = hash_password(password)
    try:
        with conn.begin_nested():
            row = conn.execute(text("""
                INSERT INTO users (id, email, display_name, password_hash)
                VALUES (:id, :email, :name, :hash) RETURNING id, email, display_name, created_at"""),
                {"id": "usr_" + uuid.uuid4().hex[:20], "email": address, "name": display_name,
                 "hash": password_hash}).mappings().one()
    except IntegrityError as exc:
        raise EmailTaken("an account with this email already exists") from exc
    return User.from_mapping(row)


def authenticate_password(conn: Connection, *, email: str, password: str) -> User:
    row = conn.execute(text("""
        SELECT id, email, display_name, created_at, password_hash, disabled_at FROM users WHERE email = :e"""),
        {"e": email.strip().lower()}).mappings().first()
    stored = row["password_hash"] if row is not None else _DUMMY_HASH
    try:
        _HASHER.verify(stored, password)
    except (VerificationError, InvalidHashError):
        raise Unauthorized("wrong email or password") from None
    if row is None or row["disabled_at"] is not None:
        raise Unauthorized("wrong email or password")
    if _HASHER.check_needs_rehash(stored):
        conn.execute(text("UPDATE users SET password_hash = :h WHERE id = :id"),
                     {"h": _HASHER.hash(password), "id": row["id"]})
    return User.from_mapping(row)


def get_user(conn: Connection, *, user_id: str) -> User | None:
    row = conn.execute(text("SELECT id, email, display_name, created_at FROM users WHERE id = :id"),
                       {"id": user_id}).mappings().first()
    return User.from_mapping(row) if row else None


def find_user_by_email(conn: Connection, *, email: str) -> User | None:
    row = conn.execute(text("SELECT id, email, display_name, created_at FROM users WHERE email = :e"),
                       {"e": email.strip().lower()}).mappings().first()
    return User.from_mapping(row) if row else None
