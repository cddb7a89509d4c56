"""What counts as a credential, in one place: variable names and URLs that carry one.

Credentials reach genmodels through the environment only (MLFLOW_TRACKING_USERNAME/PASSWORD or
_TOKEN, AWS_* variables, a Kubernetes Secret on a cluster's nodes), which MLflow, boto3 and
libpq read themselves; genmodels never prints, logs or records them, and refuses them where
they would be shown: in a job's runtime env or command (`genmodels.cluster.check_not_secret`)
and in MLFLOW_TRACKING_URI (`genmodels.tracking.resolve_tracking`).
"""

from __future__ import annotations

import re

_SECRET_WORDS = {"PASSWORD", "PASSWD", "PASS", "SECRET", "TOKEN", "KEY", "CREDENTIAL", "CREDENTIALS", "AUTH", "PRIVATE"}
# user[:password]@ after the scheme; a password may hold "/" (SQLAlchemy parses postgresql://u:pa/ss@h/db so)
_USERINFO = re.compile(r"([a-z][a-z0-9+.-]*)://([^\s/@:]*(?::[^\s@]*)?)@", flags=re.I)


def secret_name(name: str) -> bool:
    """A variable named like a credential, by `_`-separated word: API_KEY, DB_PASS; not TOKENIZERS_PARALLELISM."""
    return bool(_SECRET_WORDS & set(re.split(r"[_\W]+", name.upper())))


def url_credentials(text: str, *, passwords_only: bool = False) -> list[str]:
    """The schemes of the URLs in `text` with credentials: a user and password (user:secret@), or
    with `passwords_only` False any user part (a token alone: https://TOKEN@host). Never the
    credentials themselves, so that the result can go into a message."""
    return [scheme for scheme, userinfo in _USERINFO.findall(text) if not passwords_only or ":" in userinfo]
