"""`plugshare`: the command line. Thin: it parses, talks to the node (or creates its home) and
prints. Exit 0 on success, 2 on usage errors, 1 on any other error with one clear line (with
--json: one JSON document `{"error": ..., "reason": ...}` on stdout instead).

Every command, group and the root take `--home` and `--json` (`_shared_options`), anywhere on
the line: their callbacks store into the one `Context` object all click contexts share."""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import sys
from pathlib import Path
from typing import Any

import attrs
import click
import tomli_w

from plugshare import __version__
from plugshare.config import (
    Address,
    ApiSection,
    Config,
    NodeSection,
    PeerSection,
    StoreSection,
    TokenSection,
    check_name,
    default_node_name,
)
from plugshare.errors import PlugshareError
from plugshare.node.home import Home, default_home


@attrs.define
class Context:
    """What the shared options set, wherever they were on the line."""

    home_path: Path | None = None  # --home
    as_json: bool = False  # --json

    @property
    def home(self) -> Home:
        return Home(self.home_path or default_home())

    @property
    def home_source(self) -> str:
        if self.home_path is not None:
            return "--home"
        return "environment" if os.environ.get("PLUGSHARE_HOME") else "default"

    def hint(self, *words: str) -> str:
        """`plugshare WORDS...` as a command to copy: quoted, with `--home DIR` unless the
        home is the one a plain `plugshare` would use."""
        extra = []
        if self.home_path is not None and (
                os.path.abspath(self.home_path) != os.path.abspath(default_home())):
            extra = ["--home", str(self.home_path)]
        return shlex.join(["plugshare", *words, *extra])

    def emit(self, data: Any, human: str | None = None) -> None:
        """One JSON document with --json, else the human text (or a readable dump)."""
        if self.as_json:
            click.echo(json.dumps(data, indent=2, sort_keys=True))
        else:
            click.echo(human if human is not None else json.dumps(data, indent=2))

    def client(self):
        from plugshare.node.client import NodeClient

        return NodeClient(self.home)


pass_ctx = click.make_pass_decorator(Context, ensure=True)

_JSON_HELP = 'JSON on stdout: the result, or {"error", "reason"} on failure.'
_HOME_HELP = "The node's home directory [default: $PLUGSHARE_HOME, else the user data dir]."


def _set_home(ctx: click.Context, _param, value: Path | None) -> None:
    if value is not None:
        ctx.ensure_object(Context).home_path = value


def _set_json(ctx: click.Context, _param, value: bool) -> None:
    if value:
        ctx.ensure_object(Context).as_json = True


def _shared_options(command: click.Command) -> click.Command:
    """Give `command` the options every command takes (once). Eager, so that --json is known
    before any other value is checked (a usage error is then JSON too)."""
    if not any("--json" in p.opts for p in command.params):
        command.params += [
            click.Option(["--home", "_home"], type=click.Path(file_okay=False, path_type=Path),
                         metavar="DIR",
                         expose_value=False, is_eager=True, callback=_set_home, help=_HOME_HELP),
            click.Option(["--json", "_json"], is_flag=True, expose_value=False, is_eager=True,
                         callback=_set_json, help=_JSON_HELP),
        ]
    return command


class CliError(click.ClickException):
    """A failure to show: one line, or `{"error": code, "reason": message}` with --json."""

    def __init__(self, message: str, error: str, reason: str | None, as_json: bool):
        super().__init__(message)
        self.error = error
        self.reason = reason or message
        self.as_json = as_json


def _error_code(exc: Exception) -> str:
    code = getattr(exc, "error", None)  # the API's own code, e.g. not_found
    if isinstance(code, str) and code:
        return code
    return re.sub(r"(?<!^)(?=[A-Z])", "_", type(exc).__name__).lower()  # HomeError: home_error


def _failure(ctx: click.Context, exc: PlugshareError) -> CliError:
    """The error as the person should read it: hints naming `plugshare run`/`init` become
    the command to type for this very home."""
    state = ctx.ensure_object(Context)
    message = re.sub(r"`plugshare (run|init)`", lambda m: f"`{state.hint(m.group(1))}`",
                     str(exc))
    reason = getattr(exc, "reason", None)  # an API refusal: its reason, the code apart
    return CliError(message, _error_code(exc), reason if isinstance(reason, str) else None,
                    state.as_json)


def _json_asked(exc: click.ClickException, args: list[str]) -> bool:
    """Was --json on the line? The shared Context knows once its option was processed; a
    line that failed to parse before that is read as given (up to a `--`)."""
    if isinstance(exc, CliError):
        return exc.as_json
    ctx = getattr(exc, "ctx", None)
    state = ctx.find_object(Context) if ctx is not None else None
    if state is not None and state.as_json:
        return True
    words = args[: args.index("--")] if "--" in args else args
    return "--json" in words


def _show(exc: click.ClickException, args: list[str]) -> None:
    if not _json_asked(exc, args):
        exc.show()
        return
    if isinstance(exc, click.UsageError):
        error = {"error": "usage", "reason": exc.format_message()}
    else:
        error = {"error": getattr(exc, "error", "error"),
                 "reason": getattr(exc, "reason", exc.format_message())}
    click.echo(json.dumps(error, indent=2, sort_keys=True))


class _Group(click.Group):
    """Every group: gives each command below it the shared options, and turns the project's
    errors into one clear line (or JSON) and exit 1."""

    group_class = type  # subgroups are _Group too

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _shared_options(self)

    def add_command(self, cmd: click.Command, name: str | None = None) -> None:
        super().add_command(_shared_options(cmd), name)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except PlugshareError as exc:
            raise _failure(ctx, exc) from None
        except BaseExceptionGroup as group:  # a failure inside the node's task tree
            cause = _first_error(group)
            if cause is None:
                raise
            raise _failure(ctx, cause) from None


class _Root(_Group):
    """`plugshare` itself: also loads the terminal views (textual is heavy) only when they
    are asked for, and shows errors the way --json asks."""

    _LAZY = {"watch": ("plugshare.node.watch", "watch"), "demo": ("plugshare.node.demo", "demo"),
             "relay": ("plugshare.relay.command", "relay")}
    group_class = _Group

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self._LAZY})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self._LAZY:
            import importlib

            module, attr = self._LAZY[name]
            return _shared_options(getattr(importlib.import_module(module), attr))
        return super().get_command(ctx, name)

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True,
             **extra: Any) -> Any:
        """click's standalone mode, but errors are shown as --json asks."""
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        args = list(sys.argv[1:] if args is None else args)
        try:
            result = super().main(args, prog_name, complete_var, False, **extra)
        except click.ClickException as exc:
            _show(exc, args)
            sys.exit(exc.exit_code)
        except click.Abort as exc:
            if isinstance(exc.__cause__, KeyboardInterrupt):  # Ctrl-C: the shell's convention
                click.echo("interrupted", err=True)
                sys.exit(130)
            click.echo("Aborted!", err=True)
            sys.exit(1)
        sys.exit(result if isinstance(result, int) else 0)


def _first_error(group: BaseExceptionGroup) -> PlugshareError | None:
    for exc in group.exceptions:
        if isinstance(exc, PlugshareError):
            return exc
        if isinstance(exc, BaseExceptionGroup) and (found := _first_error(exc)):
            return found
    return None


@click.group(cls=_Root, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="plugshare")
@click.pass_context
def cli(ctx: click.Context) -> None:
    """A personal-cloud sharing node: your documents, shared with your peers' nodes,
    every access decided by your secure token.

    \b
    Every command takes --home DIR and --json, before or after its name.
    With --json, stdout holds one JSON document: the result, or on failure
    {"error": ..., "reason": ...} (exit 1; exit 2 for usage errors).
    Without it, errors are one line on stderr.

    \b
    Shell completion: eval "$(plugshare completion bash)"  (also zsh, fish)
    """
    ctx.ensure_object(Context)


def _address(_ctx, param, value: str | None) -> Address | None:
    if value is None:
        return None
    try:
        return Address.parse(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param=param) from None


def _name(_ctx, param, value: str | None) -> str | None:
    """--name and --as: the one rule for names (`config.check_name`)."""
    if value is None:
        return None
    try:
        return check_name(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param=param) from None


@cli.command()
@click.option("--name", callback=_name,
              help="The node's name, shown to peers: 1-63 letters, digits, '.', '_' or '-' "
                   "[default: the host name].")
@click.option("--store", "backend", type=click.Choice(["sqlite", "couchdb"]), default="sqlite",
              show_default=True, help="Embedded SQLite, or a CouchDB-compatible server.")
@click.option("--couchdb-url", help="URL of the CouchDB server (with --store couchdb).")
@click.option("--peer-listen", callback=_address, help="HOST:PORT for peers [0.0.0.0:7415].")
@click.option("--api-listen", callback=_address, help="HOST:PORT of the local API [127.0.0.1:7414].")
@click.option("--no-discovery", is_flag=True, help="Do not announce or browse on the LAN.")
@click.option("--keystore", type=click.Choice(["soft", "pkcs11"]), default="soft",
              show_default=True, help="Where the token's master key lives.")
@click.option("--passphrase-from", metavar="env:VAR|file:PATH",
              help="soft keystore: read a passphrase from there [default: a key file].")
@click.option("--pkcs11-module", metavar="PATH", help="pkcs11: the PKCS#11 library.")
@click.option("--pkcs11-token", metavar="LABEL", help="pkcs11: the device token's label.")
@click.option("--pkcs11-pin", metavar="env:VAR|file:PATH", help="pkcs11: the user PIN's source.")
@pass_ctx
def init(ctx: Context, name, backend, couchdb_url, peer_listen, api_listen, no_discovery,
         keystore, passphrase_from, pkcs11_module, pkcs11_token, pkcs11_pin) -> None:
    """Create a node's home: node.toml, token state and identity, owner credential."""
    if backend == "couchdb" and not couchdb_url:
        raise click.UsageError("--store couchdb needs --couchdb-url URL")
    if couchdb_url and backend != "couchdb":
        raise click.UsageError("--couchdb-url goes with --store couchdb")
    if keystore == "soft" and (pkcs11_module or pkcs11_token or pkcs11_pin):
        raise click.UsageError("--pkcs11-* options go with --keystore pkcs11")
    if keystore == "pkcs11" and passphrase_from:
        raise click.UsageError("--passphrase-from goes with --keystore soft")
    token = {"keystore": keystore, "passphrase": passphrase_from, "pin": pkcs11_pin}
    if pkcs11_module:
        token["module"] = pkcs11_module
    if pkcs11_token:
        token["token_label"] = pkcs11_token
    if keystore == "pkcs11":  # several nodes may share one device: each its own objects
        import secrets

        token["key_label"] = f"plugshare-{name or default_node_name()}-{secrets.token_hex(4)}"
    config = _initial_config(name, backend, couchdb_url, peer_listen, api_listen,
                             no_discovery, token)
    node_id = ctx.home.create(config)
    ctx.emit(
        {"home": str(ctx.home.root), "name": config.node.name, "node_id": node_id},
        f"created node {config.node.name!r} in {ctx.home.root}\nnode id: {node_id}\n"
        f"start it with: {ctx.hint('run')}",
    )


def _initial_config(name, backend, couchdb_url, peer_listen, api_listen,
                    no_discovery, token: dict | None = None) -> Config:
    from plugshare.config import ConfigError

    defaults = Config()
    try:
        return Config(
            node=NodeSection(name=name or default_node_name()),
            store=StoreSection(backend=backend, url=couchdb_url),
            peer=PeerSection(listen=peer_listen or defaults.peer.listen,
                             discovery=not no_discovery),
            api=ApiSection(listen=api_listen or defaults.api.listen),
            token=TokenSection(**(token or {})),
        )
    except ValueError as exc:
        raise ConfigError(f"bad option: {exc}") from None


@cli.group()
def token() -> None:
    """The secure token, in its own process (`plugshare run` starts one by itself)."""


@token.command("run")
@pass_ctx
def token_run(ctx: Context) -> None:
    """Run this home's token process alone, in the foreground; a `plugshare run` started
    afterwards uses it instead of starting its own."""
    if not ctx.home.exists():
        raise click.ClickException(f"{ctx.home.root} holds no node yet: "
                                   f"`{ctx.hint('init')}` first")
    # The token's code runs in a process of its own: exec it, import none of it here.
    os.execv(sys.executable, [sys.executable, "-m", "plugshare.token", "--home",
                              str(ctx.home.root)])


@cli.command()
@click.option("-v", "--verbose", is_flag=True, help="Log everything (debug), for this run.")
@click.option("-q", "--quiet", is_flag=True, help="Log warnings and errors only, for this run.")
@pass_ctx
def run(ctx: Context, verbose: bool, quiet: bool) -> None:
    """Run the node in the foreground until Ctrl-C / SIGTERM. The log level is `[log] level`
    in node.toml (info by default) unless -v or -q is given. Under systemd (a `Type=notify`
    unit) it tells readiness, and leaves timestamps to the journal."""
    import trio

    from plugshare.node.node import run_node

    if verbose and quiet:
        raise click.UsageError("-v and -q cannot be used together")
    config_level = ctx.home.load_config().log.level if ctx.home.exists() else "info"
    level = "debug" if verbose else "warning" if quiet else config_level
    _configure_logging(level)
    if not ctx.home.exists():
        node_id = ctx.home.create(_initial_config(None, "sqlite", None, None, None, False))
        click.echo(f"created a new node in {ctx.home.root} (node id {node_id})", err=True)
    trio.run(lambda: run_node(ctx.home))  # it logs where it serves, once, and when it stops


def _configure_logging(level: str) -> None:
    from plugshare.node.systemd import stderr_is_journal

    # The journal stamps every line and knows the process: a timestamp of our own is noise.
    layout = ("%(levelname)s %(name)s: %(message)s" if stderr_is_journal()
              else "%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.basicConfig(level=getattr(logging, level.upper()), format=layout, stream=sys.stderr)
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.root.level))


@cli.command()
@pass_ctx
def status(ctx: Context) -> None:
    """The node's name, id, addresses, store, peers and shares."""
    with ctx.client() as client:
        info = client.request("GET", "/status")
    store = info["store"]
    ctx.emit(
        info,
        "\n".join([
            f"node     {info['name']}",
            f"id       {info['node_id']}",
            f"api      {info['api']}",
            f"peer     {info.get('peer_address') or '-'}",
            *(f"relay    {r['relay']} ({'joined' if r['joined'] else 'not joined, retrying'})"
              for r in info.get("relays") or []),
            f"store    {store['backend']} ({store['doc_count']} docs, seq {store['update_seq']})",
            f"peers    {len(info['peers'])}",
            f"shares   {len(info['shares'])}",
        ]),
    )


_HOME_SOURCES = {"--home": "--home", "environment": "environment: PLUGSHARE_HOME",
                 "default": "default"}


@cli.command("config")
@click.option("--example", is_flag=True,
              help="Print a commented example node.toml: every key, its default, what it does.")
@pass_ctx
def config_command(ctx: Context, example: bool) -> None:
    """The configuration in effect: each key of the home's node.toml with its value and
    where it comes from (node.toml, or default when not set), and the home itself (--home,
    environment PLUGSHARE_HOME, or default). Needs no running node. The text form is valid
    TOML, each value commented with its source."""
    from plugshare.config import example_config, explain_config

    if example:
        text = example_config()
        ctx.emit({"example": text}, text.rstrip("\n"))
        return
    home = ctx.home
    explained = explain_config(home.config_file)
    exists = home.config_file.exists()
    data = {
        "home": {"value": str(home.root), "source": ctx.home_source},
        "file": str(home.config_file),
        "file_exists": exists,
        "values": {section: {key: {"value": value, "source": source}
                             for key, (value, source) in fields.items()}
                   for section, fields in explained.items()},
    }
    lines = [f"# home {home.root}  ({_HOME_SOURCES[ctx.home_source]})",
             f"# file {home.config_file}" + ("" if exists else
                                               f"  (missing: create it with `{ctx.hint('init')}`)")]
    for section, fields in explained.items():
        lines += ["", f"[{section}]"]
        for key, (value, source) in fields.items():
            setting = f"# {key} (not set)" if value is None else \
                tomli_w.dumps({key: value}).strip()
            lines.append(f"{setting:<40}  # {source}")
    ctx.emit(data, "\n".join(lines))


@cli.command()
@click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]))
@pass_ctx
def completion(ctx: Context, shell: str) -> None:
    """Print the completion script for SHELL (commands, options, choices).

    \b
    bash: eval "$(plugshare completion bash)"   in ~/.bashrc
    zsh:  eval "$(plugshare completion zsh)"    in ~/.zshrc
    fish: plugshare completion fish > ~/.config/fish/completions/plugshare.fish
    """
    from click.shell_completion import get_completion_class

    complete = get_completion_class(shell)
    script = complete(cli, {}, "plugshare", "_PLUGSHARE_COMPLETE").source()
    ctx.emit({"shell": shell, "script": script}, script.rstrip("\n"))


# -- documents ------------------------------------------------------------------------


@cli.group()
def doc() -> None:
    """Read and write documents through the running node."""


def _parse_body(text: str) -> dict:
    if text == "-":
        text = sys.stdin.read()
    try:
        body = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PlugshareError(f"the document is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise PlugshareError("the document must be a JSON object, e.g. '{\"title\": \"hi\"}'")
    return body


def _quote(doc_id: str) -> str:
    from urllib.parse import quote

    return quote(doc_id, safe="")


@doc.command("put")
@click.argument("doctype")
@click.argument("document", metavar="JSON|-")
@click.option("--id", "doc_id", help="The document id [default: a new random id].")
@click.option("--rev", help="The current rev, to update an existing document.")
@pass_ctx
def doc_put(ctx: Context, doctype: str, document: str, doc_id: str | None, rev: str | None):
    """Create or update a document; prints its id and new rev."""
    body = _parse_body(document)
    if rev:
        body["_rev"] = rev
    with ctx.client() as client:
        if doc_id:
            result = client.request("PUT", f"/data/{_quote(doctype)}/{_quote(doc_id)}", json=body)
        else:
            result = client.request("POST", f"/data/{_quote(doctype)}/", json=body)
    ctx.emit(result, f"{result['id']} {result['rev']}")


@doc.command("get")
@click.argument("doc_id", metavar="ID")
@click.option("--rev", help="A given revision instead of the winner.")
@click.option("--conflicts", is_flag=True, help="Also list the conflicting revisions.")
@pass_ctx
def doc_get(ctx: Context, doc_id: str, rev: str | None, conflicts: bool) -> None:
    """Print a document (its winning revision, or the one asked)."""
    params = {"conflicts": "true"} if conflicts else {}
    if rev:
        params["rev"] = rev
    with ctx.client() as client:
        result = client.request("GET", f"/docs/{_quote(doc_id)}", params=params)
    ctx.emit(result, json.dumps(result, indent=2, ensure_ascii=False))


@doc.command("list")
@click.option("--doctype", help="Only documents of this doctype.")
@pass_ctx
def doc_list(ctx: Context, doctype: str | None) -> None:
    """List live documents."""
    with ctx.client() as client:
        if doctype:
            result = client.request("GET", f"/data/{_quote(doctype)}/")
        else:
            result = client.request("GET", "/docs/")
    lines = [f"{d['_id']}  {d['_rev']}  {d.get('doctype', '')}" for d in result["docs"]]
    ctx.emit(result, "\n".join(lines) if lines else "(no documents)")


@doc.command("rm")
@click.argument("doc_id", metavar="ID")
@click.option("--rev", required=True, help="The current rev of the document.")
@pass_ctx
def doc_rm(ctx: Context, doc_id: str, rev: str) -> None:
    """Delete a document (writes a tombstone revision)."""
    with ctx.client() as client:
        result = client.request("DELETE", f"/docs/{_quote(doc_id)}", params={"rev": rev})
    ctx.emit(result, f"{result['id']} {result['rev']} (deleted)")


# -- files: documents' attachments ------------------------------------------------------


@cli.group("file")
def file_group() -> None:
    """Attach files to documents and get them back, streamed (see plugshare/node/transfer.py)."""


@file_group.command("put")
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--doctype", required=True, help="The document's doctype.")
@click.option("--id", "doc_id", help="The document [default: a new random id].")
@click.option("--name", help="The attachment's name [default: the file's name].")
@click.option("--type", "content_type", metavar="MIME",
              help="Its content type [default: guessed from the name].")
@pass_ctx
def file_put(ctx: Context, path: Path, doctype: str, doc_id: str | None, name: str | None,
             content_type: str | None) -> None:
    """Attach a file to a document (made if missing); prints the id, rev and digest."""
    import uuid

    from plugshare.node.transfer import upload

    with ctx.client() as client:
        result = upload(client, path, doctype=doctype, doc_id=doc_id or uuid.uuid4().hex,
                        name=name or path.name, content_type=content_type,
                        show=not ctx.as_json and sys.stderr.isatty())
    ctx.emit(result, f"{result['id']} {result['rev']} {result['name']} "
                     f"{result['length']} bytes {result['digest']}")


@file_group.command("get")
@click.argument("doc_id", metavar="ID")
@click.argument("name")
@click.option("-o", "--output", "out", required=True,
              type=click.Path(dir_okay=False, path_type=Path), help="Where to write it.")
@pass_ctx
def file_get(ctx: Context, doc_id: str, name: str, out: Path) -> None:
    """Save a document's attachment to a file (checked against its digest)."""
    from plugshare.node.transfer import download

    with ctx.client() as client:
        result = download(client, doc_id, name, out,
                          show=not ctx.as_json and sys.stderr.isatty())
    ctx.emit(result, f"{result['path']} {result['length']} bytes {result['digest']}")


@file_group.command("ls")
@click.argument("doc_id", metavar="ID")
@pass_ctx
def file_ls(ctx: Context, doc_id: str) -> None:
    """List a document's attachments: name, size, content type, digest, and whether the
    data is on this node (a share fetched on read gets it when first read)."""
    from plugshare.node.transfer import attachments

    with ctx.client() as client:
        doc, stubs = attachments(client, doc_id)
    rows = [{"name": n, **{k: v for k, v in s.items() if k != "stub"}}
            for n, s in sorted(stubs.items())]
    for row in rows:  # data fetched on first read and not read yet: "local": false
        row["local"] = row.get("local", True)
    lines = [f"{r['name']}  {r['length']}  {r['content_type']}  {r['digest']}  "
             + ("local" if r["local"] else "not local (fetched when read)") for r in rows]
    ctx.emit({"id": doc_id, "rev": doc["_rev"], "attachments": rows},
             "\n".join(lines) if lines else "(no attachments)")


@file_group.command("pin")
@click.argument("doc_id", metavar="ID")
@click.option("--off", is_flag=True, help="Unpin it (its data stays here).")
@pass_ctx
def file_pin(ctx: Context, doc_id: str, off: bool) -> None:
    """Pin a document for eager download: in a share this node fetches on read, its
    attachment data is fetched now and as its revisions arrive, not when first read."""
    with ctx.client() as client:
        result = client.request("DELETE" if off else "PUT", f"/pins/{_quote(doc_id)}")
    ctx.emit(result, f"{result['id']}: " + ("pinned, its data fetched as it arrives"
                                            if result["pinned"] else "unpinned"))


@file_group.command("pins")
@pass_ctx
def file_pins(ctx: Context) -> None:
    """List the documents pinned for eager download."""
    with ctx.client() as client:
        result = client.request("GET", "/pins")
    ctx.emit(result, "\n".join(result["pins"]) or "(no pinned documents)")


# -- the token: apps, rules, encryption, audit ------------------------------------------


def _parse_selector(text: str | None) -> dict | None:
    if text is None:
        return None
    try:
        selector = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PlugshareError(f"--selector is not valid JSON: {exc}") from None
    if not isinstance(selector, dict):
        raise PlugshareError('--selector must be a JSON object, e.g. \'{"tags": {"$in": ["x"]}}\'')
    return selector


_PERM = click.Choice(["read", "write"])


@cli.group()
def app() -> None:
    """Local apps: each gets a credential and the access its grant allows."""


@app.command("add")
@click.argument("name")
@click.option("--doctype", required=True, help="The doctype the app may use.")
@click.option("--perm", type=_PERM, required=True, help="read, or write (implies read).")
@click.option("--selector", help="Only documents matching this Mango-style JSON selector.")
@pass_ctx
def app_add(ctx: Context, name: str, doctype: str, perm: str, selector: str | None) -> None:
    """Register an app; prints its credential once (keep it: it is stored only as a hash)."""
    body = {"name": name, "doctype": doctype, "perm": perm,
            "selector": _parse_selector(selector)}
    with ctx.client() as client:
        result = client.request("POST", "/token/apps", json=body)
    ctx.emit(result, f"app {name!r} added; its credential (shown once):\n{result['credential']}")


@app.command("list")
@pass_ctx
def app_list(ctx: Context) -> None:
    """List the registered apps and their grants."""
    with ctx.client() as client:
        result = client.request("GET", "/token/apps")
    lines = [f"{a['name']}  {a['perm']} {a['doctype']}"
             + (f"  {json.dumps(a['selector'])}" if a["selector"] else "")
             for a in result["apps"]]
    ctx.emit(result, "\n".join(lines) or "(no apps)")


@app.command("rm")
@click.argument("name")
@pass_ctx
def app_rm(ctx: Context, name: str) -> None:
    """Remove an app: its credential stops working and its rules go."""
    with ctx.client() as client:
        result = client.request("DELETE", f"/token/apps/{_quote(name)}")
    ctx.emit(result, f"app {name!r} removed")


@cli.group()
def rule() -> None:
    """Access rules held by the token (deny by default)."""


@rule.command("add")
@click.option("--doctype", required=True, help="The doctype the rule covers.")
@click.option("--selector", help="Only documents matching this Mango-style JSON selector.")
@click.option("--app", "app_name", help="Grant to this app.")
@click.option("--role", help="Grant to every app or peer with this role.")
@click.option("--peer", help="Grant to this peer (its node id).")
@click.option("--perm", type=_PERM, required=True, help="read, or write (implies read).")
@pass_ctx
def rule_add(ctx: Context, doctype, selector, app_name, role, peer, perm) -> None:
    """Grant a permission on documents to an app, a role or a peer."""
    subjects = [(k, v) for k, v in (("app", app_name), ("role", role), ("peer", peer)) if v]
    if len(subjects) != 1:
        raise click.UsageError("give exactly one of --app, --role, --peer")
    (kind, subject), = subjects
    body = {"doctype": doctype, "subject_kind": kind, "subject": subject, "perm": perm,
            "selector": _parse_selector(selector)}
    with ctx.client() as client:
        result = client.request("POST", "/token/rules", json=body)
    ctx.emit(result, f"rule {result['id']} added")


@rule.command("list")
@pass_ctx
def rule_list(ctx: Context) -> None:
    """List the rules."""
    with ctx.client() as client:
        result = client.request("GET", "/token/rules")
    lines = [f"{r['id']}  {r['subject_kind']}:{r['subject']}  {r['perm']} {r['doctype']}"
             + (f"  {json.dumps(r['selector'])}" if r["selector"] else "")
             for r in result["rules"]]
    ctx.emit(result, "\n".join(lines) or "(no rules)")


@rule.command("rm")
@click.argument("rule_id", metavar="ID")
@pass_ctx
def rule_rm(ctx: Context, rule_id: str) -> None:
    """Remove a rule."""
    with ctx.client() as client:
        result = client.request("DELETE", f"/token/rules/{_quote(rule_id)}")
    ctx.emit(result, f"rule {rule_id} removed")


@cli.command()
@click.argument("doctype")
@pass_ctx
def encrypt(ctx: Context, doctype: str) -> None:
    """Store DOCTYPE encrypted from now on (existing docs are re-written encrypted)."""
    with ctx.client() as client:
        result = client.request("POST", f"/token/encrypt/{_quote(doctype)}")
    ctx.emit(result, f"{doctype}: stored encrypted from now on "
                     f"({result['rewritten']} existing documents re-written)")


@cli.command()
@click.option("--tail", default=20, show_default=True, type=click.IntRange(1, 100_000),
              help="How many of the latest (matching) entries to show.")
@click.option("--verify", is_flag=True, help="Check every seal and the whole hash chain.")
@click.option("--denied", is_flag=True, help="Only refusals.")
@click.option("--principal", metavar="WHO",
              help="Only decisions about WHO: owner:owner, app:NAME, peer:NODE_ID, anonymous.")
@click.option("--since", metavar="WHEN",
              help="Only entries since WHEN: a time ago (30m, 12h, 7d, 2w), a date "
                   "(2026-12-01, 2026-12-01T08:00) or a Unix time.")
@click.option("--prune", metavar="BEFORE",
              help="Drop the log's segments older than BEFORE (same forms as --since); what "
                   "stays is still verifiable (--verify), from a checkpoint.")
@pass_ctx
def audit(ctx: Context, tail: int, verify: bool, denied: bool, principal: str | None,
          since: str | None, prune: str | None) -> None:
    """The token's decision log: every decision, hash-chained and sealed."""
    import datetime

    if prune is not None:
        if denied or principal or since:
            raise click.UsageError("--prune takes none of --denied, --principal, --since")
        with ctx.client() as client:
            done = client.request("POST", "/token/audit/prune",
                                  json={"before": _past_time(prune, "--prune")})
        ctx.emit(done, f"pruned {done['entries']} entries ({done['segments']} segments); "
                       f"the log is verifiable from entry {done['verifiable_from']}")
        return
    params = {"tail": tail, "verify": "true" if verify else "false"}
    if denied:
        params["denied"] = "true"
    if principal:
        params["principal"] = principal
    if since is not None:
        params["since"] = _past_time(since, "--since")
    with ctx.client() as client:
        result = client.request("GET", "/token/audit", params=params)
    lines = []
    for e in result["entries"]:
        when = datetime.datetime.fromtimestamp(e["time"]).isoformat(timespec="seconds")
        what = " ".join(x for x in (e["doctype"], e["doc_id"]) if x)
        times = f" (×{e['count']})" if e.get("count", 1) > 1 else ""
        lines.append(f"{e['seq']:>6} {when} {'allow' if e['allowed'] else 'DENY ':5} "
                     f"{e['principal']} {e['action']} {what} - {e['reason']}{times}")
    if verify:
        v = result["verify"]
        lines.append(f"chain verified: {v['entries']} entries intact" if v["ok"] else
                     f"CHAIN BROKEN at entry {v['first_bad']} ({v['entries']} entries)")
    ctx.emit(result, "\n".join(lines) or "(no matching entries)")
    if verify and not result["verify"]["ok"]:
        sys.exit(1)


def _past_time(text: str, option: str) -> float:
    """A moment in the past: `30m`/`12h`/`7d`/`2w` ago, an ISO date or time, or a Unix time."""
    import datetime
    import re
    import time

    match = re.fullmatch(r"\s*(\d+)\s*([smhdw])\s*", text)
    if match:
        unit = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}[match.group(2)]
        return time.time() - int(match.group(1)) * unit
    try:
        return float(text)
    except ValueError:
        pass
    try:
        moment = datetime.datetime.fromisoformat(text.strip())
    except ValueError:
        raise click.BadParameter(f"{text!r} is neither a time ago (30m, 12h, 7d), a date "
                                 "(2026-12-01) nor a Unix time", param_hint=option) from None
    if moment.tzinfo is None:
        moment = moment.astimezone()  # a local time, as a person means it
    return moment.timestamp()


# -- shares and peers -----------------------------------------------------------------


@cli.group()
def share() -> None:
    """Share documents with other people's nodes."""


def _share_summary(s: dict) -> str:
    who = "owner" if s["role"] == "owner" else f"member ({s['permission'] or '-'})"
    active = sum(1 for m in s["members"] if m["status"] == "active")
    docs = "?" if s["docs"] is None else s["docs"]  # None: the store is down
    return (f"{s['name']}  {s['doctype']}  {who}  {s['status']}  {active} members  "
            f"{docs} docs" + ("  encrypted" if s["encrypted"] else ""))


def _sync_state(link: dict) -> str:
    """A link's sync state; for a stream waiting to start again, why and when."""
    state, why = link.get("state") or "?", link.get("error")
    if state == "retrying":
        retry_in = link.get("retry_in")
        when = (f"next attempt in {retry_in:.0f} s" if isinstance(retry_in, (int, float))
                else "the peer starts it again")
        return f"retrying ({when}): {why}"
    if state == "error" and why:
        return f"error: {why}"
    return state


def _expiry(text: str | None) -> float | None:
    """`--expires`: a duration from now (30m, 12h, 30d, 2w) or a unix time."""
    if text is None:
        return None
    import re
    import time

    match = re.fullmatch(r"\s*(\d+)\s*([smhdw])\s*", text)
    if match:
        unit = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}[match.group(2)]
        return time.time() + int(match.group(1)) * unit
    try:
        when = float(text)
    except ValueError:
        when = 0.0
    if when <= time.time():
        raise click.BadParameter(f"{text!r} is neither a duration (30m, 12h, 30d, 2w) nor a "
                                 "unix time in the future", param_hint="--expires")
    return when


@share.command("create")
@click.argument("name")
@click.option("--doctype", required=True, help="Share every document of this doctype...")
@click.option("--selector", help="...or only those matching this Mango-style JSON selector.")
@click.option("--encrypt", is_flag=True, help="Members store and send it only encrypted.")
@click.option("--expires", metavar="WHEN", help="The share ends then (30d, 12h, or a unix "
              "time): members' tokens destroy its keys, also offline.")
@click.option("--max-file-size", type=click.IntRange(min=0), metavar="BYTES",
              help="Refuse attachments larger than this in the share's documents.")
@click.option("--file-type", "file_types", multiple=True, metavar="MIME",
              help="Allow only attachments of this content type (image/png, or image/*); "
                   "repeat for more.")
@pass_ctx
def share_create(ctx: Context, name: str, doctype: str, selector: str | None, encrypt: bool,
                 expires: str | None, max_file_size: int | None, file_types: tuple[str, ...]):
    """Create a share (this node is its owner)."""
    body = {"name": name, "doctype": doctype, "selector": _parse_selector(selector),
            "encrypt": encrypt, "expires": _expiry(expires),
            "max_attachment_size": max_file_size, "attachment_types": list(file_types) or None}
    with ctx.client() as client:
        result = client.request("POST", "/shares", json=body)
    ctx.emit(result, f"share {name!r} created ({doctype}); invite members with "
                     f"`{ctx.hint('share', 'invite', name)}`")


@share.command("invite")
@click.argument("name")
@click.option("--read-only", is_flag=True, help="The new member may read but not write.")
@click.option("--ttl", default="1h", show_default=True, help="How long the code is valid.")
@click.option("--qr", is_flag=True, help="Also draw the code as a QR code (to scan from a phone).")
@click.option("--expires", metavar="WHEN", help="The new member's membership ends then (30d, "
              "12h, or a unix time): its token destroys the share's keys, also offline.")
@click.option("--cancel", "cancel", metavar="CODE_OR_ID", help="Instead of inviting, cancel "
              "an open invitation, by its code or its id (`plugshare share invitations`).")
@pass_ctx
def share_invite(ctx: Context, name: str, read_only: bool, ttl: str, qr: bool,
                 expires: str | None, cancel: str | None) -> None:
    """Print a one-line invitation code for one new member (single use); or, with --cancel,
    cancel one not used yet."""
    if cancel is not None:
        if read_only or qr or expires is not None:
            raise click.UsageError("--cancel takes none of --read-only, --qr, --expires")
        with ctx.client() as client:
            result = client.request(
                "DELETE", f"/shares/{_quote(name)}/invitations/{_quote(cancel.strip())}")
        ctx.emit(result, f"invitation {result['id']} to share {name!r} cancelled; its code "
                         "admits no one now")
        return
    with ctx.client() as client:
        result = client.request("POST", f"/shares/{_quote(name)}/invite",
                                json={"read_only": read_only, "ttl": ttl,
                                      "expires": _expiry(expires)})
    if qr and not ctx.as_json:
        click.echo(_qr_text(result["code"]), err=True)  # stdout stays the bare code
    if not ctx.as_json:
        membership = _expiry(expires)
        click.echo(f"single use, {'read-only' if read_only else 'read-write'}; valid until "
                   f"{_local_time(result['expires_at'])}"
                   + (f"; membership until {_local_time(membership)}" if membership else ""),
                   err=True)
    ctx.emit(result, result["code"])


def _local_time(when: float) -> str:
    import datetime

    return datetime.datetime.fromtimestamp(when).astimezone().strftime("%Y-%m-%d %H:%M %Z")


@share.command("invitations")
@click.argument("name", required=False)
@pass_ctx
def share_invitations(ctx: Context, name: str | None) -> None:
    """List the open invitations (not used, not expired) of every share, or of NAME."""
    import time

    path = f"/shares/{_quote(name)}/invitations" if name else "/invitations"
    with ctx.client() as client:
        rows = client.request("GET", path)["invitations"]
    if not rows:
        ctx.emit({"invitations": rows}, "no open invitations")
        return
    lines = []
    for row in rows:
        left = max(0, int(row["expires_at"] - time.time()))
        lines.append(f"{row['share']}  {row['id']}  {row['permission']}  expires in "
                     f"{left // 3600}h{left % 3600 // 60:02d}m")
    first = rows[0]
    lines.append(f"cancel one with `{ctx.hint('share', 'invite', first['share'], '--cancel', first['id'])}`")
    ctx.emit({"invitations": rows}, "\n".join(lines))


def _qr_text(text: str) -> str:
    import io

    import qrcode

    code = qrcode.QRCode(border=2, error_correction=qrcode.constants.ERROR_CORRECT_L)
    code.add_data(text)
    out = io.StringIO()
    code.print_ascii(out=out, invert=True)
    return out.getvalue()


@share.command("accept")
@click.argument("code")
@click.option("--as", "as_name", callback=_name,
              help="Your name in the share, same rule as a node's [default: the node's name].")
@click.option("--no-progress", is_flag=True, help="Return at once; do not wait for the sync.")
@pass_ctx
def share_accept(ctx: Context, code: str, as_name: str | None, no_progress: bool) -> None:
    """Join a share with an invitation code; its initial sync starts at once."""
    with ctx.client() as client:
        result = client.request("POST", "/join", json={"code": code.strip(), "as": as_name})
    if result.get("pending"):
        ctx.emit(result, _pending_accept_text(ctx, result))
        return
    if ctx.as_json or no_progress:
        ctx.emit(result, _share_summary(result))
        return
    name = result["name"]
    try:
        click.echo(f"joined {name!r} ({result['doctype']}); syncing...", err=True)
        from plugshare.node.progress import follow_initial_sync

        interrupted = follow_initial_sync(ctx.home, name).reason == "interrupted"
    except KeyboardInterrupt:  # before the progress view took Ctrl-C over
        interrupted = True
        click.echo(f"{name}: stopped watching; the sync goes on in the background — "
                   f"`{ctx.hint('share', 'show', name)}` shows it", err=True)
    if interrupted:  # only the showing stops: the node goes on syncing
        raise SystemExit(130)
    with ctx.client() as client:  # the share as it is now, not as it was when joined
        result = client.request("GET", f"/shares/{_quote(name)}")
    click.echo(_share_summary(result))


def _pending_accept_text(ctx: Context, join: dict) -> str:
    return (f"share {join['share']}: the owner is unreachable; {join['reason']}\n"
            f"the join is pending: this node retries it by itself until the invitation "
            f"expires ({_local_time(join['expires_at'])}); a node restart forgets it\n"
            f"see it with `{ctx.hint('share', 'joins')}`, stop it with "
            f"`{ctx.hint('share', 'joins', '--cancel', join['share'])}`")


def _pending_line(join: dict) -> str:
    return f"{join['share']}  {join['state']}  invitation valid until " \
           f"{_local_time(join['expires_at'])}"


@share.command("joins")
@click.option("--cancel", "cancel", metavar="SHARE", help="Stop waiting for the owner of "
              "this pending join (its share id, as listed).")
@pass_ctx
def share_joins(ctx: Context, cancel: str | None) -> None:
    """List the joins waiting for an unreachable owner (`share accept` keeps retrying them
    until the invitation expires; a node restart forgets them); or, with --cancel, stop one."""
    if cancel is not None:
        with ctx.client() as client:
            result = client.request("DELETE", f"/joins/{_quote(cancel.strip())}")
        ctx.emit(result, f"pending join of share {result['share']} cancelled")
        return
    with ctx.client() as client:
        result = client.request("GET", "/joins")
    rows = result["joins"]
    if not rows:
        ctx.emit(result, "no pending joins")
        return
    lines = [_pending_line(j) + f"  (tried {j['tries']}x: {j['reason']})" for j in rows]
    lines.append(f"cancel one with `{ctx.hint('share', 'joins', '--cancel', rows[0]['share'])}`")
    ctx.emit(result, "\n".join(lines))


@share.command("link")
@click.argument("name")
@click.option("--read-only", is_flag=True, help="The client may read but not write.")
@click.option("--expires", metavar="DURATION", help="The link stops working after this long "
              "(90s, 30m, 1h, 2d, 1w, as `share invite --ttl`) [default: until unlinked].")
@pass_ctx
def share_link(ctx: Context, name: str, read_only: bool, expires: str | None) -> None:
    """Print a URL with a credential of its own that lets a CouchDB-protocol client (PouchDB,
    CouchDB) replicate share NAME, enforced by this node's token; `share unlink` revokes it.
    The credential is shown this once."""
    import time

    from plugshare.sharing.invitation import InvalidTtl, parse_ttl

    until = None
    if expires is not None:
        try:
            until = time.time() + parse_ttl(expires)
        except InvalidTtl as exc:
            raise click.BadParameter(str(exc), param_hint="--expires") from None
    with ctx.client() as client:
        result = client.request("POST", f"/shares/{_quote(name)}/links",
                                json={"permission": "read" if read_only else "write",
                                      "expires": until})
        url, note = _link_url(client.base_url, result)
    result["url"] = url
    if not ctx.as_json:
        click.echo(f"link {result['id']}, {'read-only' if read_only else 'read-write'}, "
                   + (f"until {_local_time(result['expires'])}" if result["expires"]
                      else "until unlinked")
                   + f"; unlink with `{ctx.hint('share', 'unlink', name, result['id'])}`",
                   err=True)
        if note:
            click.echo(note, err=True)
    ctx.emit(result, url)  # stdout holds the URL alone, to copy


def _link_url(api: str, link: dict) -> tuple[str, str | None]:
    """The URL a CouchDB client replicates the share from, with the link's id and credential
    as user and password; and a note when outside clients cannot reach that address."""
    import ipaddress
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(api)
    host = parts.hostname or "127.0.0.1"
    note = None
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        address = None
    if address is not None and address.is_unspecified:  # listens on every address
        host = socket.gethostname()
    elif host == "localhost" or (address is not None and address.is_loopback):
        note = ("note: the API listens on loopback only; for clients on other machines set "
                "`[api] listen` in node.toml to another address (e.g. \"0.0.0.0:7414\") and "
                "restart the node (the API speaks plain HTTP: outside the LAN, put TLS in "
                "front of it)")
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{link['id']}:{link['credential']}@{host}:{parts.port}"
    return f"{parts.scheme}://{netloc}/couch/share:{link['share']}", note


@share.command("unlink")
@click.argument("name")
@click.argument("link", metavar="LINK")
@pass_ctx
def share_unlink(ctx: Context, name: str, link: str) -> None:
    """Revoke link LINK (its id, as `share links` lists it, or its credential or URL) of
    share NAME: its credential stops working at once."""
    with ctx.client() as client:
        result = client.request("DELETE",
                                f"/shares/{_quote(name)}/links/{_quote(_link_id(link))}")
    ctx.emit(result, f"link {result['id']} of share {name!r} unlinked")


def _link_id(text: str) -> str:
    """A link's id from its id, its credential (`ps1.<id>.<secret>`) or its URL."""
    from urllib.parse import urlsplit

    text = text.strip()
    if "://" in text:
        text = urlsplit(text).username or text
    parts = text.split(".")
    return parts[1] if len(parts) == 3 and parts[0] == "ps1" else text


def _link_line(row: dict) -> str:
    expires = _local_time(row["expires"]) if row["expires"] else "never"
    return (f"{row['id']}  {row['share']:<16} {row['permission']:<5}  "
            f"{_local_time(row['created'])}  {expires:<21}  {row['status']}")


@share.command("links")
@click.argument("name", required=False)
@pass_ctx
def share_links(ctx: Context, name: str | None) -> None:
    """List the links for outside clients (of every share, or of NAME): id, share,
    permission, created, expires, status (active, expired, ended, unlinked)."""
    path = f"/shares/{_quote(name)}/links" if name else "/links"
    with ctx.client() as client:
        rows = client.request("GET", path)["links"]
    if not rows:
        ctx.emit({"links": rows}, "no links")
        return
    header = f"{'id':<16}  {'share':<16} {'perm':<5}  {'created':<21}  {'expires':<21}  status"
    ctx.emit({"links": rows}, "\n".join([header, *map(_link_line, rows)]))


@share.command("revoke")
@click.argument("name")
@click.argument("member")
@pass_ctx
def share_revoke(ctx: Context, name: str, member: str) -> None:
    """Remove MEMBER (its name or node id) from a share you own."""
    with ctx.client() as client:
        result = client.request("POST", f"/shares/{_quote(name)}/revoke",
                                json={"member": member})
    ctx.emit(result, f"{member} revoked from {name!r} (manifest v{result['version']})")


@share.command("leave")
@click.argument("name")
@pass_ctx
def share_leave(ctx: Context, name: str) -> None:
    """Leave a share you are a member of (your local copy stays)."""
    with ctx.client() as client:
        result = client.request("POST", f"/shares/{_quote(name)}/leave")
    note = "" if result.get("owner_notified") else " (the owner is offline and was not told)"
    ctx.emit(result, f"left {name!r}{note}")


@share.command("fetch")
@click.argument("name")
@click.argument("mode", type=click.Choice(["eager", "on-read"]))
@pass_ctx
def share_fetch(ctx: Context, name: str, mode: str) -> None:
    """How this node fetches a share's attachment data: eager (as documents arrive, the
    default) or on-read (documents arrive with stubs; data is fetched when first read, from
    a connected member). Back to eager fetches what is missing."""
    with ctx.client() as client:
        result = client.request("PUT", f"/shares/{_quote(name)}/fetch", json={"fetch": mode})
    ctx.emit(result, f"{result['share']}: attachment data fetched "
             + ("when first read" if result["fetch"] == "on-read" else "as documents arrive"))


@share.command("rm")
@click.argument("name")
@pass_ctx
def share_rm(ctx: Context, name: str) -> None:
    """Forget a share you left or were revoked from, so it is listed no more (its documents
    stay in your store; sealed ones stay unreadable). An invitation can bring you back."""
    with ctx.client() as client:
        result = client.request("DELETE", f"/shares/{_quote(name)}")
    ctx.emit(result, f"forgot {result['name']!r}")


@share.command("list")
@pass_ctx
def share_list(ctx: Context) -> None:
    """List shares."""
    with ctx.client() as client:
        result = client.request("GET", "/shares")
    lines = [_share_summary(s) for s in result["shares"]]
    lines += [_pending_line(j) for j in result.get("pending", [])]
    ctx.emit(result, "\n".join(lines) or "(no shares)")


@share.command("show")
@click.argument("name")
@pass_ctx
def share_show(ctx: Context, name: str) -> None:
    """A share's rule and members (name, id, permission, status) and sync state."""
    with ctx.client() as client:
        s = client.request("GET", f"/shares/{_quote(name)}")
    if s.get("pending"):  # a join waiting for its owner
        ctx.emit(s, f"{_pending_line(s)}\nlast try: {s['reason']}")
        return
    lines = [_share_summary(s), f"id       {s['id']} (manifest v{s['version']})",
             f"rule     doctype {s['doctype']}"
             + (f", selector {json.dumps(s['selector'])}" if s["selector"] else ""),
             f"fetch    {s.get('fetch', 'eager')} (attachment data: "
             + ("when first read)" if s.get("fetch") == "on-read" else "as documents arrive)")]
    for m in s["members"]:
        lines.append(f"member   {m['name']:<16} {m['id']}  {m['permission']:<5}  {m['status']}"
                     + ("  connected" if m["connected"] else ""))
    for p in s["peers"]:
        lines.append(f"sync     {p['peer']:<16} {_sync_state(p)}")
    with ctx.client() as client:  # this node's links to the share, for outside clients
        s["links"] = client.request("GET", f"/shares/{_quote(name)}/links")["links"]
    for row in s["links"]:
        lines.append(f"link     {row['id']}  {row['permission']:<5}  {row['status']}"
                     + (f"  until {_local_time(row['expires'])}" if row["expires"] else ""))
    ctx.emit(s, "\n".join(lines))


@cli.command()
@pass_ctx
def peers(ctx: Context) -> None:
    """Known peers (id, name, addresses, connected or not, last seen), and nodes nearby on
    the LAN that are not peers yet."""
    import datetime

    with ctx.client() as client:
        result = client.request("GET", "/peers")
    lines = []
    for p in result["peers"]:
        seen = (datetime.datetime.fromtimestamp(p["last_seen"]).isoformat(timespec="seconds")
                if p["last_seen"] else "never")
        state = "offline"
        if p["connected"]:  # via: direct or relay; RTT once the first keepalive came back
            rtt = f", rtt {p['rtt_ms']:.1f} ms" if p.get("rtt_ms") is not None else ""
            state = f"connected via {p.get('via') or 'direct'}{rtt}"
        lines.append(f"{p['name'] or '?':<16} {p['id']}  {state:<9}  "
                     f"{', '.join(p['addresses']) or '-'}  last seen {seen}")
    if not lines:
        lines.append("(no peers yet)")
    nearby = result.get("nearby") or []
    if nearby:
        lines.append("nearby on the LAN (not peers; invite them to a share):")
        lines += [f"  {n['name'] or '?':<14} {n['id']}  {', '.join(n['addresses']) or '-'}"
                  for n in nearby]
    ctx.emit(result, "\n".join(lines))


def main() -> None:
    cli(prog_name="plugshare")


if __name__ == "__main__":
    main()
