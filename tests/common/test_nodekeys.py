import pytest
import yaml
from helpers import DATA

from quil_cluster.common import nodeconfig
from quil_cluster.common.errors import ConfigError
from quil_cluster.common.nodekeys import IGNORED_KEYS, REPLACEMENTS, SECTION_KEYS

FORK_KEY = "maxFramesPerSyncPoll"
NESTED = (
    "engine.syncMessageLimits",
    "engine.framePublish",
    "engine.framePublish.fragmentation",
    "engine.framePublish.fragmentation.reedSolomon",
)


def read_reference(version):
    return (DATA / f"config-{version}.yml").read_text(encoding="utf-8")


def replace_once(text, old, new):
    assert text.count(old) == 1, old
    return text.replace(old, new)


def keys_at(data, path):
    """Return the key names of the mapping at a dotted path in loaded config data."""
    for name in path.split("."):
        data = data[name]
    return set(data)


def check(text, generation, source="config.yml"):
    nodeconfig.check_known_keys(nodeconfig.load(text, source), generation)


def check_error(text, generation, source="config.yml"):
    cfg = nodeconfig.load(text, source)
    with pytest.raises(ConfigError) as caught:
        nodeconfig.check_known_keys(cfg, generation)
    return str(caught.value)


# The key sets


def test_section_keys_match_1_4_21_file():
    data = yaml.safe_load(read_reference("1.4.21"))

    assert set(SECTION_KEYS["1.4"]) == {"engine", "p2p", "db"}
    assert keys_at(data, "engine") == SECTION_KEYS["1.4"]["engine"] - {FORK_KEY}
    assert keys_at(data, "p2p") == SECTION_KEYS["1.4"]["p2p"]
    assert keys_at(data, "db") == SECTION_KEYS["1.4"]["db"]


def test_section_keys_match_2_1_0_25_file():
    data = yaml.safe_load(read_reference("2.1.0.25"))

    # 2.1.0 to 2.1.0.4 also read maxFrames.
    assert keys_at(data, "engine") == SECTION_KEYS["2.1"]["engine"] - {FORK_KEY, "maxFrames"}
    for path in ("p2p", "db", *NESTED):
        assert keys_at(data, path) == SECTION_KEYS["2.1"][path], path


def test_section_keys_2_0_changes():
    keys_14, keys_20, keys_21 = (SECTION_KEYS[generation] for generation in ("1.4", "2.0", "2.1"))

    assert keys_14["engine"] < keys_20["engine"]
    assert keys_20["engine"] - keys_14["engine"] - keys_21["engine"] == {"fullProver", "autoMergeCoins"}
    assert keys_14["p2p"] - keys_20["p2p"] == {"minPeers"}
    assert keys_20["p2p"] < keys_21["p2p"]
    assert keys_20["db"] == keys_14["db"] == {"path"}
    for path in NESTED:
        assert keys_20[path] == keys_21[path], path
        assert path not in keys_14, path


def test_ignored_keys_belong_to_other_generations():
    for generation, names in IGNORED_KEYS.items():
        for name in names:
            path, _, key = name.rpartition(".")
            assert key not in SECTION_KEYS[generation][path], name
            assert any(key in SECTION_KEYS[other][path] for other in SECTION_KEYS if other != generation), name


def test_replacements_map_other_generation_keys_to_own():
    assert set(REPLACEMENTS) == {"1.4", "2.0"}
    for generation, replacements in REPLACEMENTS.items():
        for name, replacement in replacements.items():
            path, _, key = name.rpartition(".")
            assert key in SECTION_KEYS["2.1"][path], name
            assert key not in SECTION_KEYS[generation][path], name
            assert replacement in SECTION_KEYS[generation][path], name


# Reference files and generations


@pytest.mark.parametrize(("version", "generation"), [("1.4.21", "1.4"), ("2.1.0.25", "2.1")])
def test_known_keys_accepts_reference_file(version, generation):
    check(read_reference(version), generation, f"config-{version}.yml")


@pytest.mark.parametrize("generation", ["2.0", "2.1"])
def test_known_keys_1_4_file_in_later_generations(generation):
    # An upgraded 1.4 config keeps p2p.minPeers, which later nodes ignore harmlessly.
    # In 2.1 this also covers maxFrames and the ignored 1.4 worker keys.
    check(read_reference("1.4.21"), generation)


@pytest.mark.parametrize(
    ("generation", "line", "name", "others"),
    [("1.4", 74, "p2p.maxIDontWantMessages", "2.0 and 2.1"), ("2.0", 83, "p2p.streamListenMultiaddr", "2.1")],
)
def test_known_keys_2_1_file_in_older_generations(generation, line, name, others):
    message = check_error(read_reference("2.1.0.25"), generation)

    assert message == (
        f"config.yml:{line}: unknown key '{name}' for node {generation}; "
        f"it is a node {others} key, which node {generation} ignores, so remove it"
    )


def test_known_keys_rejects_unknown_generation():
    cfg = nodeconfig.load("engine: {}\n")

    with pytest.raises(ConfigError) as caught:
        nodeconfig.check_known_keys(cfg, "3.0")

    assert str(caught.value) == "unknown node generation '3.0'; use one of 1.4, 2.0, 2.1"


# Misspelt keys


@pytest.mark.parametrize(
    ("version", "generation", "old", "new", "message"),
    [
        (
            "1.4.21",
            "1.4",
            "  dataWorkerMultiaddrs: []\n",
            "  dataWorkersMultiaddrs: []\n",
            "config.yml:98: unknown key 'engine.dataWorkersMultiaddrs' for node 1.4; "
            "did you mean 'dataWorkerMultiaddrs'? The node ignores unknown keys, so fix or remove it",
        ),
        (
            "1.4.21",
            "1.4",
            "  path: .config/store\n",
            "  pth: .config/store\n",
            "config.yml:101: unknown key 'db.pth' for node 1.4; "
            "did you mean 'path'? The node ignores unknown keys, so fix or remove it",
        ),
        (
            "2.1.0.25",
            "2.1",
            "  dLo: 0\n",
            "  dlo: 0\n",
            "config.yml:49: unknown key 'p2p.dlo' for node 2.1; "
            "did you mean 'dLo'? The node ignores unknown keys, so fix or remove it",
        ),
        (
            "2.1.0.25",
            "2.1",
            "  workerPathPrefix:",
            "  workerPathPrefx:",
            "config.yml:152: unknown key 'db.workerPathPrefx' for node 2.1; "
            "did you mean 'workerPathPrefix'? The node ignores unknown keys, so fix or remove it",
        ),
        (
            "2.1.0.25",
            "2.1",
            "    maxRecvMsgSize: 0\n",
            "    maxRecvMessageSize: 0\n",
            "config.yml:127: unknown key 'engine.syncMessageLimits.maxRecvMessageSize' for node 2.1; "
            "did you mean 'maxRecvMsgSize'? The node ignores unknown keys, so fix or remove it",
        ),
        (
            "2.1.0.25",
            "2.1",
            '      algorithm: ""\n',
            '      algorithim: ""\n',
            "config.yml:145: unknown key 'engine.framePublish.fragmentation.algorithim' for node 2.1; "
            "did you mean 'algorithm'? The node ignores unknown keys, so fix or remove it",
        ),
        (
            "2.1.0.25",
            "2.1",
            "        dataShards: 0\n",
            "        dataShard: 0\n",
            "config.yml:147: unknown key 'engine.framePublish.fragmentation.reedSolomon.dataShard' for node 2.1; "
            "did you mean 'dataShards'? The node ignores unknown keys, so fix or remove it",
        ),
        (
            "2.1.0.25",
            "2.1",
            '  rebuildstart: ""\n',
            '  RebuildStart: ""\n',
            "config.yml:139: unknown key 'engine.RebuildStart' for node 2.1; "
            "did you mean 'rebuildstart'? The node ignores unknown keys, so fix or remove it",
        ),
    ],
)
def test_known_keys_rejects_misspelt_key(version, generation, old, new, message):
    text = replace_once(read_reference(version), old, new)

    assert check_error(text, generation) == message


def test_known_keys_without_close_match():
    message = check_error("p2p:\n  d: 6\n  meshSize: 8\n", "2.0")

    assert message == (
        "config.yml:3: unknown key 'p2p.meshSize' for node 2.0; check its spelling against "
        "the keys that node 2.0 writes to a new config.yml. The node ignores unknown keys, so fix or remove it"
    )


def test_known_keys_names_source():
    message = check_error("db:\n  paht: /var/quil/store\n", "1.4", "/etc/quil/config.yml")

    assert message.startswith("/etc/quil/config.yml:2: unknown key 'db.paht' for node 1.4; did you mean 'path'?")


def test_known_keys_rejects_non_string_key():
    message = check_error("engine:\n  filter: ff\n  true: 1\n", "1.4")

    assert message.startswith("config.yml:3: unknown key 'engine.true' for node 1.4; check its spelling")


# Keys of another generation


@pytest.mark.parametrize(
    ("key", "message"),
    [
        (
            "dataWorkerP2PMultiaddrs",
            "config.yml:98: unknown key 'engine.dataWorkerP2PMultiaddrs' for node 1.4; "
            "it is a node 2.1 key, which node 1.4 ignores, so use 'dataWorkerMultiaddrs' instead",
        ),
        (
            "dataWorkerStreamMultiaddrs",
            "config.yml:98: unknown key 'engine.dataWorkerStreamMultiaddrs' for node 1.4; "
            "it is a node 2.1 key, which node 1.4 ignores, so use 'dataWorkerMultiaddrs' instead",
        ),
        (
            "dataWorkerAnnounceP2PMultiaddrs",
            "config.yml:98: unknown key 'engine.dataWorkerAnnounceP2PMultiaddrs' for node 1.4; "
            "it is a node 2.1 key, which node 1.4 ignores, so remove it",
        ),
        (
            "dataWorkerCount",
            "config.yml:98: unknown key 'engine.dataWorkerCount' for node 1.4; "
            "it is a node 2.0 and 2.1 key, which node 1.4 ignores, so remove it",
        ),
    ],
)
def test_known_keys_later_key_in_1_4(key, message):
    text = replace_once(read_reference("1.4.21"), "  dataWorkerMultiaddrs: []\n", f"  {key}: []\n")

    assert check_error(text, "1.4") == message


def test_known_keys_stream_port_in_2_0():
    text = "engine:\n  dataWorkerBaseStreamPort: 32500\n"

    assert check_error(text, "2.0") == (
        "config.yml:2: unknown key 'engine.dataWorkerBaseStreamPort' for node 2.0; "
        "it is a node 2.1 key, which node 2.0 ignores, so use 'dataWorkerBaseListenPort' instead"
    )


def test_known_keys_nested_mapping_in_1_4():
    # The nested keys are not checked because 1.4 ignores the whole mapping.
    text = "engine:\n  framePublish:\n    mode: ful\n"

    assert check_error(text, "1.4") == (
        "config.yml:2: unknown key 'engine.framePublish' for node 1.4; "
        "it is a node 2.0 and 2.1 key, which node 1.4 ignores, so remove it"
    )


def test_known_keys_2_0_leftover_in_2_1_accepted():
    check("engine:\n  fullProver: true\n  autoMergeCoins: false\n", "2.1")


def test_known_keys_2_1_key_in_2_0():
    assert check_error("engine:\n  enableMasterProxy: true\n", "2.0") == (
        "config.yml:2: unknown key 'engine.enableMasterProxy' for node 2.0; "
        "it is a node 2.1 key, which node 2.0 ignores, so remove it"
    )


def test_known_keys_legacy_worker_keys_in_2_1():
    text = replace_once(
        read_reference("2.1.0.25"),
        "  dataWorkerMemoryLimit: 0\n",
        "  dataWorkerMemoryLimit: 0\n"
        "  dataWorkerBaseListenPort: 40000\n"
        "  dataWorkerMultiaddrs:\n"
        "  - /ip4/192.168.0.200/tcp/40000\n",
    )
    cfg = nodeconfig.load(text)

    nodeconfig.check_known_keys(cfg, "2.1")

    assert nodeconfig.legacy_keys(cfg, "2.1") == ["engine.dataWorkerMultiaddrs"]


def test_known_keys_max_frames_in_2_1():
    check("engine:\n  maxFrames: -1\n", "2.1")


# Accepted names


def test_known_keys_accepts_lower_cased_untagged_fields():
    text = 'engine:\n  difficulty: 0\n  rebuildstart: ""\n  rebuildend: ""\ndb:\n  inmemorydonotuse: false\n'

    check(text, "2.1")


@pytest.mark.parametrize("generation", ["1.4", "2.0", "2.1"])
def test_known_keys_accepts_fork_key(generation):
    check(f"engine:\n  {FORK_KEY}: 10\n", generation)


def test_known_keys_skips_other_sections():
    text = "loggr: {path: /var/log/quil}\nkey:\n  keyManagerTyp: file\nengine: {}\n"

    check(text, "2.1")


# Values that are not mappings


@pytest.mark.parametrize(
    "text",
    [
        "key: {}\n",
        "engine:\n",
        "engine: null\n",
        "engine: 5\n",
        "engine: [filter]\n",
        "p2p: 5\ndb: [path]\n",
        "engine:\n  framePublish: 5\n  syncMessageLimits:\n",
        "engine:\n  framePublish:\n    fragmentation: [reedSolomon]\n",
    ],
)
def test_known_keys_skips_non_mappings(text):
    check(text, "2.1")


def test_known_keys_checks_sections_after_non_mapping():
    message = check_error("engine: 5\np2p:\n  dLoo: 1\n", "1.4")

    assert message.startswith("config.yml:3: unknown key 'p2p.dLoo' for node 1.4; did you mean 'dLo'?")


# File order and merge keys


@pytest.mark.parametrize(
    ("text", "line", "name"),
    [
        ("engine:\n  filtr: ff\np2p:\n  dLoo: 1\n", 2, "engine.filtr"),
        ("p2p:\n  dLoo: 1\nengine:\n  filtr: ff\n", 2, "p2p.dLoo"),
        (
            "engine:\n  syncMessageLimits:\n    maxSendMsgSiz: 1\n  filtr: ff\n",
            3,
            "engine.syncMessageLimits.maxSendMsgSiz",
        ),
    ],
)
def test_known_keys_reports_first_in_file_order(text, line, name):
    message = check_error(text, "2.1")

    assert message.startswith(f"config.yml:{line}: unknown key '{name}' for node 2.1; did you mean")


def test_known_keys_checks_merged_keys_at_anchor():
    text = "gossip: &gossip\n  d: 6\n  dLoo: 4\np2p:\n  <<: *gossip\n  dHi: 12\n"

    message = check_error(text, "2.0")

    assert message.startswith("config.yml:3: unknown key 'p2p.dLoo' for node 2.0; did you mean 'dLo'?")


def test_known_keys_checks_list_of_merged_mappings():
    text = "a: &a {d: 6}\nb: &b {dLoo: 4}\np2p:\n  <<: [*a, *b]\n"

    message = check_error(text, "1.4")

    assert message.startswith("config.yml:2: unknown key 'p2p.dLoo' for node 1.4")


def test_known_keys_accepts_valid_merged_keys():
    check("base: &base {path: /var/quil/store}\ndb:\n  <<: *base\n  workerPaths: []\n", "2.1")
