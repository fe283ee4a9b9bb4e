"""`node.toml`: the node's configuration, as attrs models loaded with cattrs.

Unknown keys and bad values are errors that name the key and the file, so a typo never
silently falls back to a default.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Literal

import attrs
import cattrs
import tomli_w

from plugshare.errors import PlugshareError

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
_DB_PREFIX = re.compile(r"^[a-z][a-z0-9_-]*$")  # CouchDB database names must start so


class ConfigError(PlugshareError):
    """node.toml is unreadable, has an unknown key or a bad value."""


@attrs.frozen
class Address:
    """A `HOST:PORT` pair (`[v6]:PORT` for IPv6). Port 0 asks the OS for a free port."""

    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Address:
        host, sep, port = text.rpartition(":")
        host = host.strip("[]")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError(f"{text!r} is not HOST:PORT (e.g. 127.0.0.1:7414)")
        return cls(host, int(port))

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def check_name(value: object, what: str = "name") -> str:
    """The one rule for names (a node's, a member's in a share): 1-63 ASCII letters, digits,
    '.', '_' or '-', starting with a letter or digit. Returns `value`; `ValueError` saying
    the rule (and a valid spelling when there is one) otherwise."""
    if isinstance(value, str) and _NAME.match(value):
        return value
    message = (f"{what} {value!r} must be 1-63 letters, digits, '.', '_' or '-' "
               "(starting with a letter or digit)")
    if isinstance(value, str) and (suggestion := make_name(value, "")):
        message += f", e.g. {suggestion!r}"
    raise ValueError(message)


def make_name(text: str, fallback: str = "node") -> str:
    """`text` made a valid name: each run of other characters becomes '-'."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-._")[:63].rstrip("-._")
    return name or fallback


def default_node_name() -> str:
    """The host name (its first label), made a valid name."""
    import socket

    return make_name(socket.gethostname().split(".")[0])


def _check_name(_inst, attr, value: str) -> None:
    check_name(value, attr.name)


def _check_url(_inst, attr, value: str | list[str] | None) -> None:
    """One URL, or a list of them (the nodes of a CouchDB cluster, tried in turn)."""
    if isinstance(value, list) and not value:
        raise ValueError(f"{attr.name} must list at least one URL")
    for url in value if isinstance(value, list) else [value]:
        if url is not None and not re.match(r"^https?://[^/\s]+", url):
            raise ValueError(f"{attr.name} {url!r} must be an http:// or https:// URL")


def _check_prefix(_inst, attr, value: str) -> None:
    if not _DB_PREFIX.match(value):
        raise ValueError(f"{attr.name} {value!r} must be lowercase letters, digits, '_' or '-'")


def _check_pin_source(_inst, attr, value: str | None) -> None:
    if value is not None and not re.match(r"^(env:[A-Za-z_][A-Za-z0-9_]*|file:.+)$", value):
        raise ValueError(f"{attr.name} {value!r} must be env:VARIABLE or file:PATH")


@attrs.frozen
class NodeSection:
    name: str = attrs.field(factory=lambda: default_node_name(), validator=_check_name)


@attrs.frozen
class StoreSection:
    backend: Literal["sqlite", "couchdb"] = "sqlite"
    path: str = "store.sqlite"  # sqlite: relative to the home
    # couchdb only: a URL, or a list of the URLs of one cluster's nodes
    url: str | list[str] | None = attrs.field(default=None, validator=_check_url)
    database_prefix: str = attrs.field(default="plugshare", validator=_check_prefix)
    revs_limit: int = attrs.field(default=1000, validator=attrs.validators.ge(1))
    # how long chunks of a cut incoming file transfer are kept for it to resume
    resume_window_hours: int = attrs.field(default=72, validator=attrs.validators.ge(0))

    def __attrs_post_init__(self) -> None:
        if self.backend == "couchdb" and not self.url:
            raise ValueError("backend 'couchdb' needs url (e.g. http://127.0.0.1:5984)")


def _check_relays(_inst, attr, value: list[str]) -> None:
    from plugshare.relay.identity import RelayAddress

    for entry in value:
        try:
            RelayAddress.parse(entry)
        except ValueError as error:
            raise ValueError(f"{attr.name}: {error}") from None
    if len(value) > 4:
        raise ValueError(f"{attr.name}: at most 4 relays, got {len(value)}")


@attrs.frozen
class PeerSection:
    listen: Address = Address("0.0.0.0", 7415)
    discovery: bool = True
    static: list[Address] = attrs.field(factory=list)  # peer addresses tried without multicast
    relays: list[str] = attrs.field(factory=list, validator=_check_relays)  # "ID@HOST:PORT"
    advertise_direct: bool = True  # tell peers this node's direct addresses


@attrs.frozen
class ApiSection:
    listen: Address = Address("127.0.0.1", 7414)
    max_attachment_size: int = attrs.field(default=4 * 1024**3,
                                           validator=attrs.validators.ge(0))  # bytes

    def __attrs_post_init__(self) -> None:
        if self.listen.host not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError(f"listen {self.listen} must be a loopback address (127.0.0.1)")


@attrs.frozen
class TokenSection:
    keystore: Literal["soft", "pkcs11"] = "soft"
    passphrase: str | None = attrs.field(default=None, validator=_check_pin_source)  # soft
    module: str = "/usr/lib/softhsm/libsofthsm2.so"  # pkcs11
    token_label: str = "plugshare"  # pkcs11
    pin: str | None = attrs.field(default=None, validator=_check_pin_source)  # pkcs11
    key_label: str | None = None  # pkcs11: this node's objects on the device (set by init)


LOG_LEVELS = ("debug", "info", "warning", "error")


@attrs.frozen
class LogSection:
    # `plugshare run -v` / `-q` override it for one run.
    level: Literal["debug", "info", "warning", "error"] = "info"


@attrs.frozen
class Config:
    node: NodeSection = NodeSection()
    store: StoreSection = StoreSection()
    peer: PeerSection = PeerSection()
    api: ApiSection = ApiSection()
    token: TokenSection = TokenSection()
    log: LogSection = LogSection()


_converter = cattrs.Converter(forbid_extra_keys=True)
_converter.register_structure_hook(Address, lambda v, _: Address.parse(_expect_str(v)))
_converter.register_unstructure_hook(Address, str)


def _expect_str(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not a string")
    return value


def _strict_bool(value: object, _type: type) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{value!r} is not true or false")
    return value


def _strict_int(value: object, _type: type) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{value!r} is not an integer")
    return value


_converter.register_structure_hook(bool, _strict_bool)
_converter.register_structure_hook(int, _strict_int)
_converter.register_structure_hook(str, lambda v, _: _expect_str(v))


def _url_or_urls(value: object, _type: object) -> str | list[str]:
    if isinstance(value, list):
        return [_expect_str(url) for url in value]
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not a URL or a list of URLs")
    return value


_converter.register_structure_hook_func(lambda t: t == (str | list[str] | None), _url_or_urls)


def _where(path: str) -> str:
    """`$.store.url` -> `[store] url`, the way a person reads a TOML file."""
    parts = [p for p in re.split(r"\.|\[|\]", path.removeprefix("$")) if p]
    if not parts:
        return "top level"
    if len(parts) == 1:
        return f"[{parts[0]}]"
    return f"[{parts[0]}] {'.'.join(parts[1:])}"


def _describe(exc: BaseException, _type: object) -> str:
    if isinstance(exc, KeyError):
        return "missing value"
    text = str(exc)
    m = re.match(r"Extra fields in constructor for \w+: (.*)", text)
    if m:
        return f"unknown key(s) {m.group(1)}"
    if isinstance(exc, AttributeError) and "keys" in text:
        return "must be a table"
    m = re.match(r"(.*) not in literal typing\.Literal\[(.*)\]", text)
    if m:
        return f"{m.group(1)!r} is not one of {m.group(2)}"
    return text


def _explain(exc: Exception, file: Path) -> str:
    messages = []
    for msg in cattrs.transform_error(exc, format_exception=_describe):
        text, _, path = msg.rpartition(" @ ")
        messages.append(f"{_where(path)}: {text}")
    return f"{file}: " + "; ".join(messages)


def parse_config(data: dict, file: Path) -> Config:
    try:
        return _converter.structure(data, Config)
    except (cattrs.BaseValidationError, ValueError, TypeError) as exc:
        if isinstance(exc, cattrs.BaseValidationError):
            raise ConfigError(_explain(exc, file)) from None
        raise ConfigError(f"{file}: {exc}") from None


def _read_toml(file: Path) -> dict:
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{file} does not exist; create a home with `plugshare init`") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {file}: {exc.strerror}") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{file} is not valid TOML: {exc}") from None


def load_config(file: Path) -> Config:
    """Read and validate node.toml; any problem is a `ConfigError` naming file and key."""
    return parse_config(_read_toml(file), file)


def explain_config(file: Path) -> dict[str, dict[str, tuple[object, str]]]:
    """The effective configuration, validated: `{section: {key: (value, source)}}` with
    source "node.toml" (set in `file`) or "default" (not set, or no `file` at all). Values
    are as node.toml spells them (addresses as "HOST:PORT"; None: not set)."""
    data = _read_toml(file) if file.exists() else {}
    plain = _converter.unstructure(parse_config(data, file))
    return {
        section: {key: (value, "node.toml" if key in (data.get(section) or {}) else "default")
                  for key, value in fields.items()}
        for section, fields in plain.items()
    }


def example_config() -> str:
    """The commented example node.toml shipped with the package (every key, its default)."""
    from importlib.resources import files

    return files("plugshare").joinpath("node_example.toml").read_text(encoding="utf-8")


def dump_config(config: Config) -> str:
    """node.toml text for `config`, with a short comment per section."""
    data = _converter.unstructure(config)
    for section in data.values():
        for key in [k for k, v in section.items() if v is None]:
            del section[key]  # TOML has no null: absent means "not set"
    header = (
        "# plugshare node configuration. `plugshare config --example` shows every key,\n"
        "# commented; `plugshare config` shows the values in effect and where they come from.\n"
    )
    return header + tomli_w.dumps(data)
