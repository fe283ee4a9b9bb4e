import pytest

from plugshare.config import (
    Address,
    Config,
    ConfigError,
    check_name,
    dump_config,
    example_config,
    explain_config,
    load_config,
    default_node_name,
    make_name,
    parse_config,
)


def test_example_node_toml_is_valid_and_documents_every_key(tmp_path):
    text = example_config()
    (tmp_path / "node.toml").write_text(text)
    config = load_config(tmp_path / "node.toml")
    assert config.node.name == "alice-laptop"
    for section in Config.__attrs_attrs__:
        for field in getattr(Config(), section.name).__attrs_attrs__:
            assert f"{field.name} =" in text, f"node.toml lacks [{section.name}] {field.name}"


def test_dump_then_load_round_trips(tmp_path):
    config = parse_config(
        {"node": {"name": "bob"}, "store": {"backend": "couchdb", "url": "http://h:5984"},
         "peer": {"static": ["[::1]:7000", "10.1.2.3:7415"]}},
        tmp_path / "x.toml",
    )
    file = tmp_path / "node.toml"
    file.write_text(dump_config(config))
    assert load_config(file) == config
    assert config.peer.static == [Address("::1", 7000), Address("10.1.2.3", 7415)]


@pytest.mark.parametrize(
    "data, expected",
    [
        ({"store": {"bogus": 1}}, "[store]: unknown key(s) bogus"),
        ({"zzz": {}}, "top level: unknown key(s) zzz"),
        ({"store": {"backend": "mongo"}}, "[store] backend: 'mongo' is not one of"),
        ({"store": {"backend": "couchdb"}}, "backend 'couchdb' needs url"),
        ({"store": {"url": "ftp://x"}}, "must be an http:// or https:// URL"),
        ({"api": {"listen": "10.0.0.1:80"}}, "must be a loopback address"),
        ({"peer": {"listen": "nope"}}, "[peer] listen: 'nope' is not HOST:PORT"),
        ({"peer": {"discovery": "yes"}}, "[peer] discovery: 'yes' is not true or false"),
        ({"peer": {"static": ["a:1", "b"]}}, "[peer] static.1: 'b' is not HOST:PORT"),
        ({"node": {"name": 5}}, "[node] name: 5 is not a string"),
        ({"node": {"name": "a b"}}, "name 'a b' must be"),
        ({"node": "x"}, "[node]: must be a table"),
        ({"store": {"revs_limit": 0}}, "'revs_limit' must be >= 1"),
        ({"store": {"resume_window_hours": -1}}, "'resume_window_hours' must be >= 0"),
        ({"store": {"resume_window_hours": "3d"}}, "[store] resume_window_hours: '3d' is not an integer"),
        ({"token": {"keystore": "tpm"}}, "[token] keystore: 'tpm' is not one of"),
        ({"token": {"pin": "1234"}}, "must be env:VARIABLE or file:PATH"),
    ],
)
def test_bad_config_names_file_and_key(tmp_path, data, expected):
    with pytest.raises(ConfigError) as info:
        parse_config(data, tmp_path / "node.toml")
    message = str(info.value)
    assert message.startswith(f"{tmp_path / 'node.toml'}: ")
    assert expected in message


def test_unreadable_or_invalid_toml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist; create a home with `plugshare init`"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "node.toml"
    bad.write_text("[node\nname=")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        load_config(bad)


def test_a_generated_node_toml_points_at_the_packaged_example():
    header = dump_config(Config()).splitlines()[0]
    assert "plugshare config --example" in header and "project root" not in header


def test_explain_config_names_the_source_of_every_value(tmp_path):
    file = tmp_path / "node.toml"
    file.write_text('[store]\nrevs_limit = 10\n[token]\npin = "env:PIN"\n')
    explained = explain_config(file)
    assert explained["store"]["revs_limit"] == (10, "node.toml")
    assert explained["token"]["pin"] == ("env:PIN", "node.toml")
    assert explained["store"]["backend"] == ("sqlite", "default")
    assert explained["token"]["passphrase"] == (None, "default")
    assert explained["peer"]["listen"] == ("0.0.0.0:7415", "default")
    assert set(explained) == {s.name for s in Config.__attrs_attrs__}
    missing = explain_config(tmp_path / "nothing.toml")
    assert missing["node"]["name"] == (default_node_name(), "default")
    file.write_text("[store]\nrevs_limit = 0\n")
    with pytest.raises(ConfigError, match="revs_limit"):
        explain_config(file)


@pytest.mark.parametrize("name", ["alice", "alice-laptop", "n1", "a.b_c-d", "A" * 63])
def test_check_name_accepts(name):
    assert check_name(name) == name


@pytest.mark.parametrize("name", ["my laptop", "bob the builder", "", "-x", "A" * 64, "é", 5])
def test_check_name_refuses_with_one_message(name):
    with pytest.raises(ValueError, match="must be 1-63 letters, digits"):
        check_name(name)


def test_check_name_suggests_a_valid_spelling():
    with pytest.raises(ValueError, match="e.g. 'my-laptop'"):
        check_name("my laptop")


@pytest.mark.parametrize("text, expected", [
    ("vm", "vm"), ("alice-laptop.local", "alice-laptop.local"), ("My Laptop", "My-Laptop"),
    ("  ", "node"), ("--x--", "x"), ("é" * 3, "node"), ("a" * 80, "a" * 63),
])
def test_make_name_makes_any_text_a_valid_name(text, expected):
    assert make_name(text) == expected
    assert check_name(make_name(text))


def test_the_default_node_name_is_the_host_name_made_valid(monkeypatch):
    import socket

    monkeypatch.setattr(socket, "gethostname", lambda: "Alice's MacBook.local")
    assert default_node_name() == "Alice-s-MacBook"
    monkeypatch.setattr(socket, "gethostname", lambda: "")
    assert default_node_name() == "node"
