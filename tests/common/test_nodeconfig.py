import copy
import hashlib
import ipaddress
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from quil_cluster.common import nodeconfig
from quil_cluster.common.errors import ConfigError, MultiaddrError
from quil_cluster.common.multiaddr import TcpMultiaddr
from quil_cluster.common.nodeconfig import WorkerAddress, WorkerLists

DATA = Path(__file__).parents[1] / "data"

# Seven cores on two hosts, as in the illustration at the end of the reference files.
HOSTS = ["192.168.0.200"] * 3 + ["192.168.0.201"] * 4
LISTEN_14 = [f"/ip4/{host}/tcp/{40000 + n}" for host, n in zip(HOSTS, [0, 1, 2, 0, 1, 2, 3])]
P2P_21 = [f"/ip4/{host}/tcp/{25000 + n}" for host, n in zip(HOSTS, [0, 1, 2, 0, 1, 2, 3])]
STREAM_21 = [f"/ip4/{host}/tcp/{32500 + n}" for host, n in zip(HOSTS, [0, 1, 2, 0, 1, 2, 3])]


def read_reference(version):
    return (DATA / f"config-{version}.yml").read_text(encoding="utf-8")


def block_list(key, entries, indent="  "):
    return f"{indent}{key}:\n" + "".join(f"{indent}- {entry}\n" for entry in entries)


def replace_once(text, old, new):
    assert text.count(old) == 1, old
    return text.replace(old, new)


def fill_empty_list(text, key, entries):
    return replace_once(text, f"  {key}: []\n", block_list(key, entries))


def engine_without(data, *names):
    """Return a copy of config data without the named engine keys."""
    data = copy.deepcopy(data)
    for name in names:
        data["engine"].pop(name, None)
    return data


def ip4(address, port):
    return TcpMultiaddr(ipaddress.IPv4Address(address), port)


def load_error(text, source="config.yml"):
    with pytest.raises(ConfigError) as caught:
        nodeconfig.load(text, source)
    return str(caught.value)


def addresses_error(text, generation, error=ConfigError):
    cfg = nodeconfig.load(text)
    with pytest.raises(error) as caught:
        nodeconfig.worker_addresses(cfg, generation)
    return str(caught.value)


def render_error(text, generation, p2p, stream=None):
    cfg = nodeconfig.load(text)
    with pytest.raises(ConfigError) as caught:
        nodeconfig.render(cfg, generation, p2p, stream)
    return str(caught.value)


# Loading


def test_generations():
    assert nodeconfig.GENERATIONS == ("1.4", "2.0", "2.1")


@pytest.mark.parametrize("version", ["1.4.21", "2.1.0.25"])
def test_load_reference_files(version):
    text = read_reference(version)

    cfg = nodeconfig.load(text, f"config-{version}.yml")

    assert cfg.text == text
    assert cfg.source == f"config-{version}.yml"
    assert cfg.data == yaml.safe_load(text)
    assert isinstance(cfg.tree, yaml.MappingNode)
    assert cfg.data["engine"]["provingKeyId"] == "default-proving-key"


def test_load_reference_worker_lists_are_empty():
    cfg_14 = nodeconfig.load(read_reference("1.4.21"))
    cfg_21 = nodeconfig.load(read_reference("2.1.0.25"))

    assert cfg_14.worker_lists("1.4") == WorkerLists([], [])
    assert cfg_21.worker_lists("2.1") == WorkerLists([], [])
    assert nodeconfig.worker_addresses(cfg_21, "2.1") == {}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "engine:\n  dataWorkerCount: 1\n pendingCommitWorkers: 4\n",
            "config.yml:3: invalid YAML: while parsing a block mapping at line 1, "
            "expected <block end>, but found '<block mapping start>' (column 2)",
        ),
        (
            "engine:\n  dataWorkerMultiaddrs: [/ip4/10.0.0.1/tcp/40000,\n",
            "config.yml:3: invalid YAML: while parsing a flow node, expected the node content, "
            "but found '<stream end>' (column 1)",
        ),
        (
            "engine:\n  filter:\tff\n",
            "config.yml:2: invalid YAML: while scanning for the next token, "
            "found character '\\t' that cannot start any token (column 10)",
        ),
        (
            "engine: {}\n---\ndb: {}\n",
            "config.yml:2: invalid YAML: expected a single document in the stream at line 1, "
            "but found another document (column 1)",
        ),
        ("engine: *base\n", "config.yml:1: invalid YAML: found undefined alias 'base' (column 9)"),
        ("engine:\n  filter: \x07\n", "config.yml:2: invalid YAML: character '\\x07' is not allowed"),
        (
            "engine:\n  rebuildstart: 2024-02-30\n",
            "config.yml:2: invalid YAML value: day is out of range for month; quote it to keep it as a string",
        ),
    ],
)
def test_load_rejects_broken_yaml(text, message):
    assert load_error(text) == message


def test_load_error_names_source():
    message = load_error("engine:\n  a: 1\n b: 2\n", "/etc/quil/config.yml")

    assert message.startswith("/etc/quil/config.yml:3: invalid YAML: ")


def test_load_rejects_duplicate_top_level_key():
    text = "engine:\n  dataWorkerCount: 1\ndb:\n  path: store\nengine:\n  dataWorkerCount: 2\n"

    assert load_error(text) == (
        "config.yml:5: duplicate key 'engine' (first at line 1); "
        "the node lets the later one override the earlier, so remove one of them"
    )


def test_load_rejects_duplicate_nested_key():
    text = "engine:\n  syncMessageLimits:\n    maxRecvMsgSize: 1\n    maxRecvMsgSize: 2\n"

    assert load_error(text) == (
        "config.yml:4: duplicate key 'engine.syncMessageLimits.maxRecvMsgSize' (first at line 3); "
        "the node lets the later one override the earlier, so remove one of them"
    )


def test_load_rejects_duplicate_quoted_key():
    text = 'engine:\n  dataWorkerCount: 1\n  "dataWorkerCount": 2\n'

    assert load_error(text) == (
        "config.yml:3: duplicate key 'engine.dataWorkerCount' (first at line 2); "
        "the node lets the later one override the earlier, so remove one of them"
    )


def test_load_rejects_duplicate_key_in_list_item():
    text = "p2p:\n  directPeers:\n  - id: a\n    id: b\n"

    assert load_error(text) == (
        "config.yml:4: duplicate key 'p2p.directPeers[0].id' (first at line 3); "
        "the node lets the later one override the earlier, so remove one of them"
    )


def test_load_rejects_duplicate_key_in_flow_mapping():
    assert load_error("engine: {filter: a, filter: b}\n") == (
        "config.yml:1: duplicate key 'engine.filter' (first at line 1); "
        "the node lets the later one override the earlier, so remove one of them"
    )


def test_load_reports_first_duplicate_in_document_order():
    text = "key:\n  a: 1\n  a: 2\nengine:\n  b: 1\n  b: 2\n"

    assert load_error(text).startswith("config.yml:3: duplicate key 'key.a'")


def test_load_accepts_same_key_in_different_mappings():
    cfg = nodeconfig.load("p2p:\n  network: 0\nengine:\n  network: 1\n")

    assert cfg.data == {"p2p": {"network": 0}, "engine": {"network": 1}}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "- engine\n- db\n",
            "config.yml:1: the top level is a list; expected a mapping with sections such as 'engine:'",
        ),
        (
            "# comment\nengine\n",
            "config.yml:2: the top level is a string ('engine'); expected a mapping with sections such as 'engine:'",
        ),
        ("", "config.yml:1: the file has no settings; expected a mapping with sections such as 'engine:'"),
        (
            "# only a comment\n",
            "config.yml:1: the file has no settings; expected a mapping with sections such as 'engine:'",
        ),
    ],
)
def test_load_rejects_top_level_not_mapping(text, message):
    assert load_error(text) == message


def billion_laughs(tail=""):
    """Return nine levels of anchors, each a list of ten aliases of the level before, then tail.

    The text is about 600 bytes, but expanded, the last list contains 10^9 strings.
    """
    lines = ["l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for level in range(1, 10):
        lines.append(f"l{level}: &l{level} [" + ", ".join([f"*l{level - 1}"] * 10) + "]")
    return "\n".join(lines) + "\n" + tail


# Seconds a guarded check may run. Each one takes well under a second, but code
# that walks every alias expansion takes hours, so a hang fails the test here.
GUARD_SECONDS = 30


def run_guarded(code, text):
    """Run code in a fresh interpreter with text on stdin; return its stdout or fail on a hang."""
    try:
        result = subprocess.run(
            [sys.executable, "-c", code], input=text, capture_output=True, text=True, timeout=GUARD_SECONDS
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running after {GUARD_SECONDS} s; a walk of the YAML tree follows aliases again")
    assert result.returncode == 0, result.stderr
    return result.stdout


LOAD_ERROR = """
import sys
from quil_cluster.common import nodeconfig
from quil_cluster.common.errors import ConfigError
try:
    nodeconfig.load(sys.stdin.read())
except ConfigError as err:
    print(err)
"""


def test_load_rejects_billion_laughs():
    payload = billion_laughs("rebuildstart: 2024-02-30\n")

    assert run_guarded(LOAD_ERROR, payload) == (
        "config.yml:5: aliases repeat more than 100000 values once this one is expanded; "
        "a node config needs no aliases, so write the values out in place\n"
    )


FIRST_BAD_SCALAR = """
import sys
import yaml
from quil_cluster.common import nodeconfig
tree = yaml.compose(sys.stdin.read(), Loader=yaml.SafeLoader)
nodeconfig._reject_duplicates(tree, "config.yml")
print(nodeconfig._first_bad_scalar(tree).start_mark.line + 1)
"""


def test_tree_walks_visit_aliased_nodes_once():
    # Composed without the alias limit, so that the walks meet the whole tree.
    assert run_guarded(FIRST_BAD_SCALAR, billion_laughs("rebuildstart: 2024-02-30\n")) == "11\n"


def aliases_of(count, size):
    """Return a config whose aliases repeat an anchored list of size - 1 strings count times."""
    items = ", ".join(["x"] * (size - 1))
    return f"base: &base [{items}]\ncopies: [" + ", ".join(["*base"] * count) + "]\n"


def test_load_accepts_aliases_up_to_limit():
    text = aliases_of(10, nodeconfig.MAX_ALIASED_VALUES // 10)

    assert len(nodeconfig.load(text).data["copies"]) == 10


def test_load_rejects_aliases_over_limit():
    text = aliases_of(10, nodeconfig.MAX_ALIASED_VALUES // 10) + "one: &one x\nmore: *one\n"

    assert load_error(text) == (
        "config.yml:4: aliases repeat more than 100000 values once this one is expanded; "
        "a node config needs no aliases, so write the values out in place"
    )


@pytest.mark.parametrize("text", ["loop: &x [*x]\n", "loop: &x\n- *x\n", "loop: &x {self: *x}\n"])
def test_load_rejects_recursive_alias(text):
    line = text.count("\n", 0, text.index("*x")) + 1

    assert load_error(text) == (
        f"config.yml:{line}: alias '*x' refers to the list or mapping that contains it (a recursive value); "
        "write the values out in place"
    )


@pytest.mark.parametrize("opening", ["[", "{a: "])
def test_load_rejects_deep_nesting(opening):
    closing = "]" if opening == "[" else "}"
    text = "engine: " + opening * 5000 + closing * 5000 + "\n"

    assert load_error(text, "/etc/quil/config.yml") == (
        "/etc/quil/config.yml: invalid YAML: lists or mappings nested too deeply to parse; "
        "a node config has a few levels"
    )


# Reading the worker lists


def test_worker_lists_without_engine():
    cfg = nodeconfig.load("db:\n  path: store\n")

    assert cfg.worker_lists("1.4") == WorkerLists([], [])
    assert cfg.worker_lists("2.1") == WorkerLists([], [])


def test_worker_lists_with_null_values():
    cfg = nodeconfig.load("engine:\n  dataWorkerMultiaddrs:\n  dataWorkerP2PMultiaddrs: null\n")

    assert cfg.worker_lists("2.0") == WorkerLists([], [])
    assert cfg.worker_lists("2.1") == WorkerLists([], [])


def test_worker_lists_by_generation():
    text = (
        "engine:\n"
        "  dataWorkerMultiaddrs: [/ip4/10.0.0.1/tcp/40000]\n"
        "  dataWorkerP2PMultiaddrs:\n  - /ip4/10.0.0.1/tcp/25000\n"
        "  dataWorkerStreamMultiaddrs:\n  - /ip4/10.0.0.1/tcp/32500\n"
    )
    cfg = nodeconfig.load(text)

    assert cfg.worker_lists("1.4") == WorkerLists(["/ip4/10.0.0.1/tcp/40000"], [])
    assert cfg.worker_lists("2.0") == WorkerLists(["/ip4/10.0.0.1/tcp/40000"], [])
    assert cfg.worker_lists("2.1") == WorkerLists(["/ip4/10.0.0.1/tcp/25000"], ["/ip4/10.0.0.1/tcp/32500"])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "engine:\n  dataWorkerMultiaddrs:\n  - /ip4/10.0.0.1/tcp/40000\n  - 40001\n",
            "config.yml:4: engine.dataWorkerMultiaddrs[1] (core 2) must be a multiaddr string, "
            "not an integer ('40001'); write it as /ip4/A.B.C.D/tcp/PORT",
        ),
        (
            "engine:\n  dataWorkerMultiaddrs:\n  -\n",
            "config.yml:3: engine.dataWorkerMultiaddrs[0] (core 1) must be a multiaddr string, "
            "not null; write it as /ip4/A.B.C.D/tcp/PORT",
        ),
        (
            "engine:\n  dataWorkerMultiaddrs:\n  - [/ip4/10.0.0.1/tcp/40000]\n",
            "config.yml:3: engine.dataWorkerMultiaddrs[0] (core 1) must be a multiaddr string, "
            "not a list; write it as /ip4/A.B.C.D/tcp/PORT",
        ),
        (
            "engine:\n  dataWorkerMultiaddrs: /ip4/10.0.0.1/tcp/40000\n",
            "config.yml:2: engine.dataWorkerMultiaddrs must be a list of multiaddr strings, "
            "not a string ('/ip4/10.0.0.1/tcp/40000'); write one /ip4/A.B.C.D/tcp/PORT entry per core index",
        ),
        (
            "engine:\n  dataWorkerMultiaddrs:\n    core1: /ip4/10.0.0.1/tcp/40000\n",
            "config.yml:3: engine.dataWorkerMultiaddrs must be a list of multiaddr strings, "
            "not a mapping; write one /ip4/A.B.C.D/tcp/PORT entry per core index",
        ),
        ("engine: 4\n", "config.yml:1: engine must be a mapping of settings, not an integer ('4')"),
        ("engine: [a]\n", "config.yml:1: engine must be a mapping of settings, not a list"),
    ],
)
def test_worker_lists_rejects(text, message):
    cfg = nodeconfig.load(text)

    with pytest.raises(ConfigError) as caught:
        cfg.worker_lists("1.4")

    assert str(caught.value) == message


def test_worker_lists_rejects_merge_key_in_engine():
    cfg = nodeconfig.load("base: &base\n  dataWorkerCount: 2\nengine:\n  <<: *base\n")

    with pytest.raises(ConfigError) as caught:
        cfg.worker_lists("2.1")

    assert str(caught.value) == (
        "config.yml:3: engine uses a YAML merge key ('<<'); write its worker settings out in place"
    )


def test_worker_lists_rejects_unknown_generation():
    cfg = nodeconfig.load("engine: {}\n")

    with pytest.raises(ConfigError) as caught:
        cfg.worker_lists("2.2")

    assert str(caught.value) == "unknown node generation '2.2'; use one of 1.4, 2.0, 2.1"


def test_legacy_keys():
    text = (
        "engine:\n"
        "  dataWorkerMultiaddrs: [/ip4/10.0.0.1/tcp/40000]\n"
        "  dataWorkerP2PMultiaddrs: [/ip4/10.0.0.1/tcp/25000]\n"
        "  dataWorkerStreamMultiaddrs: []\n"
    )
    cfg = nodeconfig.load(text)

    assert nodeconfig.legacy_keys(cfg, "2.1") == ["engine.dataWorkerMultiaddrs"]
    assert nodeconfig.legacy_keys(cfg, "1.4") == ["engine.dataWorkerP2PMultiaddrs"]
    assert nodeconfig.legacy_keys(cfg, "2.0") == ["engine.dataWorkerP2PMultiaddrs"]


def test_legacy_keys_skips_empty_and_absent_lists():
    assert nodeconfig.legacy_keys(nodeconfig.load(read_reference("1.4.21")), "1.4") == []
    assert nodeconfig.legacy_keys(nodeconfig.load(read_reference("2.1.0.25")), "2.1") == []
    assert nodeconfig.legacy_keys(nodeconfig.load("engine:\n  dataWorkerMultiaddrs:\n"), "2.1") == []


# Worker addresses


@pytest.mark.parametrize("generation", ["1.4", "2.0"])
def test_worker_addresses_single_list(generation):
    text = (
        "engine:\n"
        "  dataWorkerMultiaddrs:\n"
        "  - /ip4/192.168.0.200/tcp/40000\n"
        "  - /ip4/192.168.0.201/tcp/40001\n"
        "  - /ip6/2001:db8::1/tcp/40002\n"
    )

    addresses = nodeconfig.worker_addresses(nodeconfig.load(text), generation)

    assert addresses == {
        1: WorkerAddress(ip4("192.168.0.200", 40000), None),
        2: WorkerAddress(ip4("192.168.0.201", 40001), None),
        3: WorkerAddress(TcpMultiaddr(ipaddress.IPv6Address("2001:db8::1"), 40002), None),
    }


def test_worker_addresses_2_1_uses_stream_as_listen():
    text = (
        "engine:\n"
        "  dataWorkerMultiaddrs: [/ip4/10.9.9.9/tcp/40000]\n"
        "  dataWorkerP2PMultiaddrs: [/ip4/0.0.0.0/tcp/25000, /ip4/192.168.0.201/tcp/25001]\n"
        "  dataWorkerStreamMultiaddrs:\n"
        "  - /ip4/192.168.0.200/tcp/32500\n"
        "  - /ip4/192.168.0.201/tcp/32501\n"
    )

    addresses = nodeconfig.worker_addresses(nodeconfig.load(text), "2.1")

    assert addresses == {
        1: WorkerAddress(listen=ip4("192.168.0.200", 32500), p2p=ip4("0.0.0.0", 25000)),
        2: WorkerAddress(listen=ip4("192.168.0.201", 32501), p2p=ip4("192.168.0.201", 25001)),
    }


def test_worker_addresses_rendered_reference():
    cfg = nodeconfig.load(read_reference("2.1.0.25"))
    rendered = nodeconfig.load(nodeconfig.render(cfg, "2.1", P2P_21, STREAM_21))

    addresses = nodeconfig.worker_addresses(rendered, "2.1")

    assert list(addresses) == [1, 2, 3, 4, 5, 6, 7]
    assert addresses[1] == WorkerAddress(ip4("192.168.0.200", 32500), ip4("192.168.0.200", 25000))
    assert addresses[7] == WorkerAddress(ip4("192.168.0.201", 32503), ip4("192.168.0.201", 25003))


def config_with_second_entry(entry, key="dataWorkerMultiaddrs"):
    return f"engine:\n  {key}:\n  - /ip4/10.0.0.1/tcp/40000\n  - {entry}\n"


@pytest.mark.parametrize(
    ("entry", "reason"),
    [
        ("/ip4/10.0.0.300/tcp/40000", "'10.0.0.300' is not an IPv4 address; use /ip4/A.B.C.D/tcp/PORT"),
        ("/ip4/10.0.0.2/tcp/0", "port '0' is not a number from 1 to 65535; use /ip4/A.B.C.D/tcp/PORT"),
        ("/ip4/10.0.0.2/tcp/70000", "port '70000' is not a number from 1 to 65535; use /ip4/A.B.C.D/tcp/PORT"),
        (
            "/ip4/10.0.0.2/udp/40001",
            "'udp' is not supported because workers listen on TCP; use /ip4/A.B.C.D/tcp/PORT",
        ),
        ("/ip4/10.0.0.2/tcp", "the TCP port is missing; use /ip4/A.B.C.D/tcp/PORT"),
        (
            "/dns4/worker-2.example/tcp/40001",
            "host names ('/dns4') are not supported because a worker binds this address; "
            "use /ip4/A.B.C.D/tcp/PORT or /ip6/ADDR/tcp/PORT",
        ),
    ],
)
def test_worker_addresses_rejects_invalid_multiaddr(entry, reason):
    message = addresses_error(config_with_second_entry(entry), "1.4", MultiaddrError)

    assert message == (
        f"config.yml:4: engine.dataWorkerMultiaddrs[1] (core 2): invalid worker multiaddr '{entry}': {reason}"
    )


def test_worker_addresses_names_source_and_2_1_list():
    text = config_with_second_entry("/ip4/10.0.0.2/tcp/0", "dataWorkerStreamMultiaddrs").replace(
        "engine:\n", "engine:\n  dataWorkerP2PMultiaddrs: [/ip4/10.0.0.1/tcp/1, /ip4/10.0.0.2/tcp/2]\n"
    )
    cfg = nodeconfig.load(text, "hosts/master/config.yml")

    with pytest.raises(MultiaddrError) as caught:
        nodeconfig.worker_addresses(cfg, "2.1")

    assert str(caught.value) == (
        "hosts/master/config.yml:5: engine.dataWorkerStreamMultiaddrs[1] (core 2): invalid worker multiaddr "
        "'/ip4/10.0.0.2/tcp/0': port '0' is not a number from 1 to 65535; use /ip4/A.B.C.D/tcp/PORT"
    )


def test_worker_addresses_2_1_unequal_lengths():
    text = (
        "engine:\n"
        "  dataWorkerP2PMultiaddrs:\n  - /ip4/10.0.0.1/tcp/25000\n  - /ip4/10.0.0.1/tcp/25001\n"
        "  dataWorkerStreamMultiaddrs:\n  - /ip4/10.0.0.1/tcp/32500\n"
    )

    assert addresses_error(text, "2.1") == (
        "config.yml:5: engine.dataWorkerP2PMultiaddrs has 2 entries but "
        "engine.dataWorkerStreamMultiaddrs has 1 entry; give both lists one entry per core index"
    )


def test_worker_addresses_2_1_missing_stream_list():
    text = "engine:\n  dataWorkerP2PMultiaddrs:\n  - /ip4/10.0.0.1/tcp/25000\n"

    assert addresses_error(text, "2.1") == (
        "config.yml:2: engine.dataWorkerP2PMultiaddrs has 1 entry but "
        "engine.dataWorkerStreamMultiaddrs has 0 entries; give both lists one entry per core index"
    )


@pytest.mark.parametrize(
    ("entry", "loopback"),
    [("/ip4/0.0.0.0/tcp/32501", "0.0.0.0 to 127.0.0.1"), ("/ip6/::/tcp/32501", ":: to ::1")],
)
def test_worker_addresses_2_1_rejects_unspecified_stream(entry, loopback):
    text = (
        "engine:\n"
        "  dataWorkerP2PMultiaddrs: [/ip4/10.0.0.1/tcp/25000, /ip4/10.0.0.1/tcp/25001]\n"
        f"  dataWorkerStreamMultiaddrs:\n  - /ip4/10.0.0.1/tcp/32500\n  - '{entry}'\n"
    )

    assert addresses_error(text, "2.1") == (
        f"config.yml:5: engine.dataWorkerStreamMultiaddrs[1] (core 2): '{entry}' is unreachable from other "
        f"hosts because the node rewrites {loopback} for stream addresses; use the host's concrete address"
    )


def test_worker_addresses_1_4_accepts_unspecified():
    cfg = nodeconfig.load("engine:\n  dataWorkerMultiaddrs: [/ip4/0.0.0.0/tcp/40000]\n")

    assert nodeconfig.worker_addresses(cfg, "1.4") == {1: WorkerAddress(ip4("0.0.0.0", 40000), None)}


# Rendering into the reference files


def test_render_reference_1_4_21():
    original = read_reference("1.4.21")
    cfg = nodeconfig.load(original, "config-1.4.21.yml")

    rendered = nodeconfig.render(cfg, "1.4", LISTEN_14)

    old_line = "  dataWorkerMultiaddrs: []\n"
    start = original.index(old_line)
    end = start + len(old_line)
    new_block = block_list("dataWorkerMultiaddrs", LISTEN_14)
    assert rendered[:start] == original[:start]
    assert rendered[start : start + len(new_block)] == new_block
    assert rendered[start + len(new_block) :] == original[end:]
    assert rendered.endswith("#   - /ip4/192.168.0.201/tcp/40003   # core 7\n")
    assert yaml.safe_load(rendered)["engine"]["dataWorkerMultiaddrs"] == LISTEN_14
    assert engine_without(yaml.safe_load(rendered), "dataWorkerMultiaddrs") == engine_without(
        cfg.data, "dataWorkerMultiaddrs"
    )


def test_render_reference_2_1_0_25():
    original = read_reference("2.1.0.25")
    cfg = nodeconfig.load(original, "config-2.1.0.25.yml")

    rendered = nodeconfig.render(cfg, "2.1", P2P_21, STREAM_21)

    p2p_line = "  dataWorkerP2PMultiaddrs: []\n"
    count_line = "  dataWorkerCount: 0\n"
    start = original.index(p2p_line)
    end = original.index(count_line) + len(count_line)
    announce = "  dataWorkerAnnounceP2PMultiaddrs: []\n  dataWorkerAnnounceStreamMultiaddrs: []\n"
    middle = (
        block_list("dataWorkerP2PMultiaddrs", P2P_21)
        + block_list("dataWorkerStreamMultiaddrs", STREAM_21)
        + announce
        + "  dataWorkerCount: 7\n"
    )
    assert rendered[:start] == original[:start]
    assert rendered[start : start + len(middle)] == middle
    assert rendered[start + len(middle) :] == original[end:]
    assert "#   dataWorkerAnnounceStreamMultiaddrs: []\n" in rendered[start + len(middle) :]
    keys = ("dataWorkerP2PMultiaddrs", "dataWorkerStreamMultiaddrs", "dataWorkerCount")
    data = yaml.safe_load(rendered)
    assert [data["engine"][key] for key in keys] == [P2P_21, STREAM_21, 7]
    assert engine_without(data, *keys) == engine_without(cfg.data, *keys)


@pytest.mark.parametrize(
    ("version", "generation", "stream"),
    [("1.4.21", "1.4", None), ("1.4.21", "2.0", None), ("2.1.0.25", "2.1", STREAM_21)],
)
def test_render_is_idempotent(version, generation, stream):
    cfg = nodeconfig.load(read_reference(version))
    p2p = P2P_21 if stream else LISTEN_14

    once = nodeconfig.render(cfg, generation, p2p, stream)
    twice = nodeconfig.render(nodeconfig.load(once), generation, p2p, stream)

    assert twice == once


def test_render_longer_then_shorter_list_1_4():
    original = read_reference("1.4.21")

    seven = nodeconfig.render(nodeconfig.load(original), "1.4", LISTEN_14)
    two = nodeconfig.render(nodeconfig.load(seven), "1.4", LISTEN_14[:2])
    empty = nodeconfig.render(nodeconfig.load(two), "1.4", [])

    assert two == fill_empty_list(original, "dataWorkerMultiaddrs", LISTEN_14[:2])
    assert empty == original


def test_render_longer_then_shorter_list_2_1():
    original = read_reference("2.1.0.25")

    seven = nodeconfig.render(nodeconfig.load(original), "2.1", P2P_21, STREAM_21)
    one = nodeconfig.render(nodeconfig.load(seven), "2.1", P2P_21[:1], STREAM_21[:1])
    empty = nodeconfig.render(nodeconfig.load(one), "2.1", [], [])

    expected = fill_empty_list(original, "dataWorkerP2PMultiaddrs", P2P_21[:1])
    expected = fill_empty_list(expected, "dataWorkerStreamMultiaddrs", STREAM_21[:1])
    expected = replace_once(expected, "  dataWorkerCount: 0\n", "  dataWorkerCount: 1\n")
    assert one == expected
    assert empty == original


def test_render_2_1_leaves_legacy_key():
    text = "engine:\n  dataWorkerMultiaddrs: [/ip4/10.0.0.9/tcp/40000]  # old\n  dataWorkerCount: 0\n"
    cfg = nodeconfig.load(text)

    rendered = nodeconfig.render(cfg, "2.1", P2P_21[:1], STREAM_21[:1])

    assert rendered == (
        "engine:\n  dataWorkerMultiaddrs: [/ip4/10.0.0.9/tcp/40000]  # old\n  dataWorkerCount: 1\n"
        + block_list("dataWorkerP2PMultiaddrs", P2P_21[:1])
        + block_list("dataWorkerStreamMultiaddrs", STREAM_21[:1])
    )
    assert nodeconfig.legacy_keys(nodeconfig.load(rendered), "2.1") == ["engine.dataWorkerMultiaddrs"]


def test_render_2_1_into_1_4_reference():
    original = read_reference("1.4.21")
    cfg = nodeconfig.load(original)

    rendered = nodeconfig.render(cfg, "2.1", P2P_21, STREAM_21)

    added = (
        block_list("dataWorkerP2PMultiaddrs", P2P_21)
        + block_list("dataWorkerStreamMultiaddrs", STREAM_21)
        + "  dataWorkerCount: 7\n"
    )
    assert rendered == replace_once(original, "  difficulty: 0\n", "  difficulty: 0\n" + added)
    assert nodeconfig.legacy_keys(nodeconfig.load(rendered), "2.1") == []


# Rendering into hand-written configs


FLOW_CONFIG = """\
# cluster master, edited by hand
p2p:
  bootstrapPeers: [/ip4/1.2.3.4/udp/8336/quic-v1, /ip4/5.6.7.8/udp/8336/quic-v1]  # two peers
  directPeers: [ ]
engine:
  # workers are filled in by the coordinator
  dataWorkerMultiaddrs: [ ]   # none yet

  # after the list
  difficulty: 0
db: {path: .config/store}
# end of file
"""


def test_render_flow_list_keeps_comments():
    rendered = nodeconfig.render(nodeconfig.load(FLOW_CONFIG), "1.4", LISTEN_14[:2])

    assert rendered == FLOW_CONFIG.replace(
        "  dataWorkerMultiaddrs: [ ]   # none yet\n",
        "  dataWorkerMultiaddrs: # none yet\n"
        "  - /ip4/192.168.0.200/tcp/40000\n"
        "  - /ip4/192.168.0.200/tcp/40001\n",
    )


def test_render_flow_list_back_to_empty():
    two = nodeconfig.render(nodeconfig.load(FLOW_CONFIG), "1.4", LISTEN_14[:2])

    empty = nodeconfig.render(nodeconfig.load(two), "1.4", [])

    assert empty == FLOW_CONFIG.replace("[ ]   # none yet", "[] # none yet")


def test_render_replaces_filled_flow_list():
    text = "engine:\n  dataWorkerMultiaddrs: [/ip4/10.0.0.1/tcp/40000, /ip4/10.0.0.1/tcp/40001]\n  difficulty: 0\n"

    rendered = nodeconfig.render(nodeconfig.load(text), "1.4", LISTEN_14[:1])

    assert rendered == "engine:\n" + block_list("dataWorkerMultiaddrs", LISTEN_14[:1]) + "  difficulty: 0\n"


def test_render_replaces_multiline_flow_list():
    text = (
        "engine:\n"
        "  dataWorkerMultiaddrs: [\n"
        "    /ip4/10.0.0.1/tcp/40000,  # core 1\n"
        "    /ip4/10.0.0.1/tcp/40001\n"
        "  ]  # end of list\n"
        "  difficulty: 0\n"
    )

    rendered = nodeconfig.render(nodeconfig.load(text), "1.4", LISTEN_14[:1])

    assert rendered == "engine:\n" + block_list("dataWorkerMultiaddrs", LISTEN_14[:1]) + "  difficulty: 0\n"


def test_render_keeps_document_markers():
    text = "---\nengine:\n  difficulty: 0\n...\n"

    rendered = nodeconfig.render(nodeconfig.load(text), "1.4", LISTEN_14[:1])

    assert rendered == "---\nengine:\n  difficulty: 0\n" + block_list("dataWorkerMultiaddrs", LISTEN_14[:1]) + "...\n"


def test_render_block_list_drops_comments_inside_it():
    text = (
        "engine:\n"
        "  dataWorkerMultiaddrs:  # filled by hand\n"
        "    # master host\n"
        "    - /ip4/10.0.0.1/tcp/40000  # core 1\n"
        "    - /ip4/10.0.0.1/tcp/40001  # core 2\n"
        "\n"
        "  # difficulty is for tests\n"
        "  difficulty: 0\n"
    )

    rendered = nodeconfig.render(nodeconfig.load(text), "1.4", LISTEN_14[:1])

    assert rendered == (
        "engine:\n"
        "  dataWorkerMultiaddrs: # filled by hand\n"
        "  - /ip4/192.168.0.200/tcp/40000\n"
        "\n"
        "  # difficulty is for tests\n"
        "  difficulty: 0\n"
    )


def test_render_adds_key_missing_from_engine():
    text = "engine:\n  provingKeyId: default-proving-key\n  difficulty: 0\n\n# after engine\ndb:\n  path: store\n"

    rendered = nodeconfig.render(nodeconfig.load(text), "1.4", LISTEN_14[:2])

    assert rendered == text.replace(
        "  difficulty: 0\n", "  difficulty: 0\n" + block_list("dataWorkerMultiaddrs", LISTEN_14[:2])
    )


def test_render_adds_key_after_nested_mapping():
    text = "engine:\n    syncMessageLimits:\n        maxRecvMsgSize: 0\n# end\n"

    rendered = nodeconfig.render(nodeconfig.load(text), "1.4", [])

    assert rendered == (
        "engine:\n    syncMessageLimits:\n        maxRecvMsgSize: 0\n    dataWorkerMultiaddrs: []\n# end\n"
    )


def test_render_2_1_adds_all_keys_in_order():
    text = "engine:\n  dataWorkerStreamMultiaddrs: []\n  difficulty: 0\n"

    rendered = nodeconfig.render(nodeconfig.load(text), "2.1", P2P_21[:2], STREAM_21[:2])

    assert rendered == (
        "engine:\n"
        + block_list("dataWorkerStreamMultiaddrs", STREAM_21[:2])
        + "  difficulty: 0\n"
        + block_list("dataWorkerP2PMultiaddrs", P2P_21[:2])
        + "  dataWorkerCount: 2\n"
    )


def test_render_adds_engine_when_absent():
    text = "key:\n  keyManagerType: file\ndb:\n  path: store\n\n# trailing comment\n"

    rendered = nodeconfig.render(nodeconfig.load(text), "1.4", LISTEN_14[:2])

    assert rendered == (
        "key:\n  keyManagerType: file\ndb:\n  path: store\nengine:\n"
        + block_list("dataWorkerMultiaddrs", LISTEN_14[:2])
        + "\n# trailing comment\n"
    )


def test_render_adds_engine_to_file_without_final_newline():
    rendered = nodeconfig.render(nodeconfig.load("db:\n  path: store"), "2.1", [], [])

    assert rendered == (
        "db:\n  path: store\nengine:\n"
        "  dataWorkerP2PMultiaddrs: []\n  dataWorkerStreamMultiaddrs: []\n  dataWorkerCount: 0"
    )


def test_render_engine_last_section():
    text = (
        "db:\n  path: store\n"
        "engine:\n  difficulty: 0\n  dataWorkerMultiaddrs:\n  - /ip4/10.0.0.1/tcp/40000\n"
        "\n# ---\n# trailing block\n#   dataWorkerMultiaddrs: []\n"
    )

    rendered = nodeconfig.render(nodeconfig.load(text), "1.4", LISTEN_14[:3])

    assert rendered == text.replace(
        "  - /ip4/10.0.0.1/tcp/40000\n", "".join(f"  - {entry}\n" for entry in LISTEN_14[:3])
    )


def test_render_engine_in_middle():
    text = (
        "key: {keyManagerType: file}\n"
        "engine:\n  dataWorkerMultiaddrs:\n  - /ip4/10.0.0.1/tcp/40000\n  - /ip4/10.0.0.1/tcp/40001\n"
        "db:\n  path: store\n"
        "listenGrpcMultiaddr: \"\"\n"
    )

    rendered = nodeconfig.render(nodeconfig.load(text), "2.0", LISTEN_14[3:4])

    assert rendered == (
        "key: {keyManagerType: file}\n"
        "engine:\n  dataWorkerMultiaddrs:\n  - /ip4/192.168.0.201/tcp/40000\n"
        "db:\n  path: store\n"
        "listenGrpcMultiaddr: \"\"\n"
    )


@pytest.mark.parametrize("value", ["", " null", " ~  # filled later"])
def test_render_engine_null(value):
    text = f"engine:{value}\ndb:\n  path: store\n"
    comment = " # filled later" if "#" in value else ""

    rendered = nodeconfig.render(nodeconfig.load(text), "1.4", LISTEN_14[:1])

    assert rendered == (
        f"engine:{comment}\n  dataWorkerMultiaddrs:\n  - /ip4/192.168.0.200/tcp/40000\ndb:\n  path: store\n"
    )


def test_render_flow_engine_mapping():
    text = "engine: {difficulty: 0, dataWorkerMultiaddrs: []}  # flow\ndb: {}\n"

    rendered = nodeconfig.render(nodeconfig.load(text), "1.4", ["/ip4/10.0.0.1/tcp/40000", "/ip6/::1/tcp/40001"])

    assert rendered == (
        'engine: {difficulty: 0, dataWorkerMultiaddrs: [/ip4/10.0.0.1/tcp/40000, "/ip6/::1/tcp/40001"]}  # flow\n'
        "db: {}\n"
    )


def test_render_adds_keys_to_flow_engine_mapping():
    rendered = nodeconfig.render(nodeconfig.load("engine: {}\n"), "2.1", P2P_21[:1], STREAM_21[:1])

    assert rendered == (
        "engine: {dataWorkerP2PMultiaddrs: [/ip4/192.168.0.200/tcp/25000], "
        "dataWorkerStreamMultiaddrs: [/ip4/192.168.0.200/tcp/32500], dataWorkerCount: 1}\n"
    )


def test_render_keeps_crlf_line_breaks():
    text = "engine:\r\n  difficulty: 0\r\n  dataWorkerMultiaddrs: []\r\ndb: {}\r\n"

    rendered = nodeconfig.render(nodeconfig.load(text), "1.4", LISTEN_14[:2])

    assert rendered == (
        "engine:\r\n  difficulty: 0\r\n  dataWorkerMultiaddrs:\r\n"
        "  - /ip4/192.168.0.200/tcp/40000\r\n  - /ip4/192.168.0.200/tcp/40001\r\ndb: {}\r\n"
    )


def test_render_writes_canonical_entries():
    text = "engine:\n  dataWorkerMultiaddrs: []\n"

    rendered = nodeconfig.render(nodeconfig.load(text), "1.4", ["/ip6/2001:DB8:0::1/tcp/040000"])

    assert rendered == "engine:\n  dataWorkerMultiaddrs:\n  - /ip6/2001:db8::1/tcp/40000\n"


# Rendering errors


def test_render_rejects_invalid_entry():
    cfg = nodeconfig.load(read_reference("1.4.21"), "config-1.4.21.yml")

    with pytest.raises(MultiaddrError) as caught:
        nodeconfig.render(cfg, "1.4", ["/ip4/10.0.0.1/tcp/40000", "/ip4/10.0.0.1/udp/40001"])

    assert str(caught.value) == (
        "config-1.4.21.yml: engine.dataWorkerMultiaddrs[1] (core 2): invalid worker multiaddr "
        "'/ip4/10.0.0.1/udp/40001': 'udp' is not supported because workers listen on TCP; use /ip4/A.B.C.D/tcp/PORT"
    )


def test_render_2_1_rejects_unequal_lengths():
    message = render_error(read_reference("2.1.0.25"), "2.1", P2P_21, STREAM_21[:6])

    assert message == (
        "config.yml: engine.dataWorkerP2PMultiaddrs has 7 entries but "
        "engine.dataWorkerStreamMultiaddrs has 6 entries; give both lists one entry per core index"
    )


def test_render_2_1_rejects_unspecified_stream():
    message = render_error("engine: {}\n", "2.1", P2P_21[:1], ["/ip4/0.0.0.0/tcp/32500"])

    assert message == (
        "config.yml: engine.dataWorkerStreamMultiaddrs[0] (core 1): '/ip4/0.0.0.0/tcp/32500' is unreachable "
        "from other hosts because the node rewrites 0.0.0.0 to 127.0.0.1 for stream addresses; "
        "use the host's concrete address"
    )


def test_render_2_1_requires_stream_list():
    message = render_error("engine: {}\n", "2.1", P2P_21[:1])

    assert message == "node generation 2.1 needs engine.dataWorkerStreamMultiaddrs; pass it as stream"


def test_render_1_4_rejects_stream_list():
    message = render_error("engine: {}\n", "1.4", LISTEN_14[:1], STREAM_21[:1])

    assert message == "node generation 1.4 has one worker list, engine.dataWorkerMultiaddrs; pass it as p2p"


def test_render_rejects_unknown_generation():
    message = render_error("engine: {}\n", "1.5", LISTEN_14[:1])

    assert message == "unknown node generation '1.5'; use one of 1.4, 2.0, 2.1"


def test_render_rejects_aliased_list():
    text = "peers: &peers []\nengine:\n  dataWorkerMultiaddrs: *peers\n"

    assert render_error(text, "1.4", LISTEN_14[:1]) == (
        "config.yml:3: 'dataWorkerMultiaddrs' is a YAML alias of line 1; "
        "write its value in place so that only the worker lists change"
    )


def test_render_rejects_aliased_engine():
    text = "base: &engine\n  difficulty: 0\nengine: *engine\n"

    assert render_error(text, "1.4", LISTEN_14[:1]) == (
        "config.yml:3: 'engine' is a YAML alias of line 1; "
        "write its value in place so that only the worker lists change"
    )


def test_render_rejects_list_that_holds_an_anchor():
    text = "engine:\n  dataWorkerMultiaddrs: &peers [/ip4/10.0.0.1/tcp/40000]\nbackup: *peers\n"

    assert render_error(text, "1.4", LISTEN_14[:1]) == (
        "config.yml: rendering the worker lists produced invalid YAML "
        "(config.yml:4: invalid YAML: found undefined alias 'peers' (column 9))"
    )


def test_sha256_hex():
    text = read_reference("1.4.21")

    assert nodeconfig.sha256_hex(text) == hashlib.sha256(text.encode("utf-8")).hexdigest()
    assert nodeconfig.sha256_hex(text.encode("utf-8")) == nodeconfig.sha256_hex(text)
    assert nodeconfig.sha256_hex("") == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
