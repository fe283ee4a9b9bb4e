"""`plugshare relay`: run a relay (click command, loaded lazily by the CLI).

Its configuration is small and its own: a TOML file (`--config`) with ``listen``, ``key`` and
a ``[limits]`` table (the fields of `RelayLimits`), each overridable on the command line.
Unknown keys and bad values are errors naming the key and the file.
"""

from __future__ import annotations

import json
import logging
import sys
import tomllib
from pathlib import Path

import attrs
import cattrs
import click

from plugshare.relay.identity import RelayAddress, load_or_create_key, public_bytes, relay_id_of
from plugshare.relay.quota import RelayLimits

DEFAULT_LISTEN = "0.0.0.0:22067"
DEFAULT_KEY = Path.home() / ".local" / "share" / "plugshare" / "relay.key"


@attrs.frozen
class RelaySettings:
    listen: str = DEFAULT_LISTEN
    key: str = str(DEFAULT_KEY)
    limits: RelayLimits = RelayLimits()


def _limits_help() -> str:
    """One line per field of RelayLimits: its name, default and what it bounds."""
    import inspect

    comments = {}
    for line in inspect.getsource(RelayLimits).splitlines():
        name, _, rest = line.strip().partition(":")
        if "#" in rest and name.isidentifier():
            comments[name] = rest.partition("#")[2].strip()
    # Indented as the docstring's lines are, so that click's dedent keeps them aligned.
    return "\n    ".join(f"  {field.name} = {field.default}   # {comments.get(field.name, '')}"
                         for field in attrs.fields(RelayLimits))


def _split(listen: str) -> tuple[str, int]:
    host, colon, port = listen.rpartition(":")
    host = host.strip("[]")
    if not colon or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise click.BadParameter(f"{listen!r} is not HOST:PORT (e.g. 0.0.0.0:22067)", param_hint="--listen")
    return host, int(port)


def load_settings(path: Path) -> RelaySettings:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise click.ClickException(f"cannot read {path}: {error.strerror}") from None
    except tomllib.TOMLDecodeError as error:
        raise click.ClickException(f"{path} is not valid TOML: {error}") from None
    converter = cattrs.Converter(forbid_extra_keys=True)
    try:
        return converter.structure(data, RelaySettings)
    except (cattrs.BaseValidationError, ValueError, TypeError) as error:
        details = "; ".join(cattrs.transform_error(error)) if isinstance(error, cattrs.BaseValidationError) else str(error)
        raise click.ClickException(f"{path}: {details}") from None


@click.command("relay")
@click.option("--listen", metavar="HOST:PORT", help=f"Where nodes connect [{DEFAULT_LISTEN}].")
@click.option("--key", "key_path", type=click.Path(dir_okay=False, path_type=Path),
              help=f"The relay's own key, created (mode 0600) on first run [{DEFAULT_KEY}].")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path, exists=True),
              help="A TOML file: listen, key, and a [limits] table.")
@click.option("-v", "--verbose", is_flag=True, help="Log every join and session.")
def relay(listen: str | None, key_path: Path | None, config_path: Path | None, verbose: bool) -> None:
    """Run a relay: nodes that cannot reach each other directly (behind NAT) are paired here,
    and it forwards their end-to-end encrypted links without being able to read them.

    \b
    It prints its address, ID@HOST:PORT (the ID is the hash of its key, which nodes pin);
    give that, with the host's public address, to nodes: `[peer] relays` in node.toml.
    The relay is stateless (nothing is written but its key): restart it at will, nodes
    rejoin by themselves. SIGTERM or Ctrl-C stops it with the line `relay stopped`.

    \b
    --config FILE is TOML with `listen`, `key` and a [limits] table (options given on the
    command line win). Unknown keys are errors. The limits, with their defaults:
    {limits}
    """
    import signal

    import trio

    from plugshare.relay.server import RelayServer

    settings = load_settings(config_path) if config_path else RelaySettings()
    host, port = _split(listen or settings.listen)
    path = key_path or Path(settings.key).expanduser()
    try:
        key = load_or_create_key(path)
    except (OSError, ValueError) as error:
        raise click.ClickException(f"cannot use the relay key {path}: {error}") from None
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    server = RelayServer(key, settings.limits)

    async def main() -> None:
        # Signals are taken before the address is printed: whoever reads it may stop us at once.
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with trio.open_nursery() as nursery:
                listeners = await nursery.start(server.serve, host, port)
                bound = listeners[0].socket.getsockname()[1]
                address = RelayAddress(relay_id_of(public_bytes(key)), host, bound)
                if getattr(click.get_current_context().find_object(object), "as_json", False):  # --json
                    click.echo(json.dumps({"relay": str(address), "key": str(path)}))
                else:
                    click.echo(f"relay {address}")
                    if host in ("0.0.0.0", "::"):
                        click.echo(f"  (give nodes this host's public address in place of {host})")
                sys.stdout.flush()
                async for number in signals:
                    stopped_by.append(signal.Signals(number).name)
                    nursery.cancel_scope.cancel()
                    break

    stopped_by: list[str] = []
    try:
        trio.run(main)
    except KeyboardInterrupt:  # Ctrl-C before the signal receiver was in place
        stopped_by.append("SIGINT")
    click.echo(f"relay stopped ({', '.join(stopped_by) or 'exited'})", err=True)


relay.help = (relay.help or "").replace("{limits}", _limits_help())
