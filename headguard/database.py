"""The example database: where the failing (and interesting) inputs a property found are kept, so the next run
replays them first.

`--database` takes a directory, a Redis URL (`redis://host:port/N`, `rediss://`, `unix://`; shared by CI workers
so each replays the others' failures) or `none`. Left out, a randomised profile (`headguard-dev`,
`headguard-fuzz`) uses the directory `.headguard/examples` under the current directory, and the derandomized
`headguard-ci` none, so that a CI verdict depends on the commit and the seed only.

Hypothesis keys examples by the test function; every subject runs the same check functions, so each property's
examples are kept under its own prefix (subject, check, variant: `engine.PropertyKey`).
"""

from __future__ import annotations

from collections.abc import Iterable

from hypothesis.database import DirectoryBasedExampleDatabase, ExampleDatabase

from headguard import profiles
from headguard.engine import PropertyKey

DEFAULT_DIRECTORY = ".headguard/examples"
_REDIS_SCHEMES = ("redis://", "rediss://", "unix://")
REDIS_INSTALL_HINT = "pip install redis"


class DatabaseError(Exception):
    """A `--database` that cannot be used; `str()` is the one line the CLI prints."""


def open_database(spec: str | None, *, profile: str, option: str = "--database") -> ExampleDatabase | None:
    """The database `--database spec` names (see the module's docstring); None when it is off. `option` names the
    option in the error messages."""
    if spec is None:
        return None if profiles.derandomized(profile) else DirectoryBasedExampleDatabase(DEFAULT_DIRECTORY)
    if spec.strip().lower() == "none":
        return None
    if spec.startswith(_REDIS_SCHEMES):
        return _redis(spec, option)
    if "://" in spec:
        raise DatabaseError(f"{option} {spec}: expected a directory, a URL starting with "
                            f"{', '.join(_REDIS_SCHEMES)} or 'none'")
    return DirectoryBasedExampleDatabase(spec)


def _redis(url: str, option: str) -> ExampleDatabase:
    try:
        import redis
    except ImportError:
        raise DatabaseError(f"{option} {url} needs the redis client: {REDIS_INSTALL_HINT}") from None
    from hypothesis.extra.redis import RedisExampleDatabase

    client = redis.Redis.from_url(url)
    try:  # refuse before the run, not with a traceback at the first example
        client.ping()
    except redis.RedisError as exc:
        raise DatabaseError(f"{option} {url}: cannot reach the Redis server ({exc})") from None
    return RedisExampleDatabase(client)


class KeyedDatabase(ExampleDatabase):
    """`inner` with every key prefixed by one property's key, so that the same check function run on two subjects
    (or twice in one check) never replays the other's examples."""

    def __init__(self, inner: ExampleDatabase, key: PropertyKey):
        super().__init__()
        self.inner = inner
        self.key = key
        self.prefix = f"headguard:{key.subject}:{key.check}:{key.variant}:".encode()

    def __repr__(self) -> str:
        return f"KeyedDatabase({self.inner!r}, {str(self.key)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, KeyedDatabase) and (self.inner, self.prefix) == (other.inner, other.prefix)

    def __hash__(self) -> int:
        return hash(self.prefix)

    def save(self, key: bytes, value: bytes) -> None:
        self.inner.save(self.prefix + key, value)

    def fetch(self, key: bytes) -> Iterable[bytes]:
        return self.inner.fetch(self.prefix + key)

    def delete(self, key: bytes, value: bytes) -> None:
        self.inner.delete(self.prefix + key, value)

    def move(self, src: bytes, dest: bytes, value: bytes) -> None:
        self.inner.move(self.prefix + src, self.prefix + dest, value)


__all__ = ["DEFAULT_DIRECTORY", "DatabaseError", "KeyedDatabase", "open_database"]
