"""Setting names the node reads under engine, p2p and db, per node generation.

The node decodes config.yml with gopkg.in/yaml.v2 into Go structs in
non-strict mode, so a name that matches no struct field is dropped without a
message. yaml.v2 matches names exactly, case included: a field's yaml tag, or
the lower-cased Go name of an untagged field (2.1 writes Difficulty as
'difficulty', RebuildStart as 'rebuildstart').

SECTION_KEYS maps each generation to the dotted path of every checked
mapping and the names allowed in it. A generation allows the union over its
patch releases, because hosts run different ones: 2.0 covers 2.0.1 to 2.0.6,
and 2.1 covers 2.1.0 to 2.1.0.25. tests/data/config-1.4.21.yml and
config-2.1.0.25.yml hold the keys those two versions write on first start, and
the tests compare these sets with them.
"""

from __future__ import annotations

__all__ = ["IGNORED_KEYS", "REPLACEMENTS", "SECTION_KEYS"]

# engine, 1.4.19 to 1.4.21, in the order that 1.4.21 writes them.
_ENGINE_1_4 = frozenset(
    {
        "provingKeyId",
        "filter",
        "genesisSeed",
        "maxFrames",
        "pendingCommitWorkers",
        "minimumPeersRequired",
        "statsMultiaddr",
        "dataWorkerBaseListenMultiaddr",
        "dataWorkerBaseListenPort",
        "dataWorkerMemoryLimit",
        "dataWorkerMultiaddrs",
        "difficulty",
    }
)

# engine, 2.0.1 to 2.0.6, with the release that added each key.
_ENGINE_2_0 = _ENGINE_1_4 | {
    "multisigProverEnrollmentPaths",  # 2.0.1
    "fullProver",  # 2.0.3-p4 to 2.0.6
    "autoMergeCoins",  # 2.0.3-p4 to 2.0.6
    "syncTimeout",  # 2.0.4
    "dataWorkerCount",  # 2.0.4-p1
    "allowExcessiveGOMAXPROCS",  # 2.0.4-p1
    "framePublish",  # 2.0.5
    "syncCandidates",  # 2.0.5-p1
    "syncMessageLimits",  # 2.0.5-p1
}

# engine, 2.1.0 to 2.1.0.25. 2.1.0 to 2.1.0.4 still read maxFrames. 2.1 drops
# the single worker list and its base port (see IGNORED_KEYS) and the 2.0 prover flags.
_ENGINE_2_1 = (_ENGINE_2_0 - {"dataWorkerBaseListenPort", "dataWorkerMultiaddrs", "fullProver", "autoMergeCoins"}) | {
    "dataWorkerBaseP2PPort",
    "dataWorkerBaseStreamPort",
    "dataWorkerP2PMultiaddrs",
    "dataWorkerStreamMultiaddrs",
    "dataWorkerAnnounceP2PMultiaddrs",  # 2.1.0.12
    "dataWorkerAnnounceStreamMultiaddrs",  # 2.1.0.12
    "dataWorkerFilters",
    "enableMasterProxy",
    "rewardStrategy",
    "archiveMode",
    "delegateAddress",
    "rewardsAddress",  # 2.1.0.21
    "archiveEndpoints",  # 2.1.0.22
    "blacklist",
    "alertKey",
    "rebuildstart",
    "rebuildend",
}

# The tjsturos/ceremonyclient fork adds this engine key, so it is allowed in
# every generation.
# NOTE: the fork version read is based on 2.0, so a 2.1-based fork may not read it.
_FORK_ENGINE_KEYS = frozenset({"maxFramesPerSyncPoll"})

# p2p, 1.4.19 to 1.4.21, in the order that 1.4.21 writes them.
_P2P_1_4 = frozenset(
    {
        "d",
        "dLo",
        "dHi",
        "dScore",
        "dOut",
        "historyLength",
        "historyGossip",
        "dLazy",
        "gossipFactor",
        "gossipRetransmission",
        "heartbeatInitialDelay",
        "heartbeatInterval",
        "fanoutTTL",
        "prunePeers",
        "pruneBackoff",
        "unsubscribeBackoff",
        "connectors",
        "maxPendingConnections",
        "connectionTimeout",
        "directConnectTicks",
        "directConnectInitialDelay",
        "opportunisticGraftTicks",
        "opportunisticGraftPeers",
        "graftFloodThreshold",
        "maxIHaveLength",
        "maxIHaveMessages",
        "iWantFollowupTime",
        "bootstrapPeers",
        "listenMultiaddr",
        "peerPrivKey",
        "traceLogFile",
        "minPeers",
        "network",
        "lowWatermarkConnections",
        "highWatermarkConnections",
    }
)

# p2p, 2.0: the keys of 2.0.6, which drops minPeers.
# NOTE: the p2p keys of 2.0.1 to 2.0.5 were not compared one by one, so a key
# that one of them reads and 2.0.6 no longer reads is reported as unknown.
_P2P_2_0 = (_P2P_1_4 - {"minPeers"}) | {
    "maxIDontWantMessages",
    "iDontWantMessageThreshold",
    "iDontWantMessageTTL",
    "directPeers",
    "grpcServerRateLimit",
    "minBootstrapPeers",
    "bootstrapParallelism",
    "discoveryParallelism",
    "discoveryPeerLookupLimit",
    "pingTimeout",
    "pingPeriod",
    "pingAttempts",
    "validateQueueSize",
    "validateWorkers",
    "subscriptionQueueSize",
    "peerOutboundQueueSize",
}

# p2p, 2.1.0 to 2.1.0.25.
_P2P_2_1 = _P2P_2_0 | {
    "streamListenMultiaddr",
    "traceLogStdout",
    "announceListenMultiaddr",  # 2.1.0.12
    "announceStreamListenMultiaddr",  # 2.1.0.12
    "peerReconnectCheckInterval",  # 2.1.0.19
}

_DB_1_4 = frozenset({"path"})

# db, 2.1: worker stores and disk-usage thresholds. inmemorydonotuse is the
# untagged test-only field InMemoryDONOTUSE.
_DB_2_1 = _DB_1_4 | {
    "workerPathPrefix",
    "workerPaths",
    "noticePercentage",
    "warnPercentage",
    "terminatePercentage",
    "inmemorydonotuse",
}

# Mappings inside engine: framePublish from 2.0.5 and syncMessageLimits from
# 2.0.5-p1, with the same fields in 2.1.
_ENGINE_NESTED = {
    "engine.syncMessageLimits": frozenset({"maxRecvMsgSize", "maxSendMsgSize"}),
    "engine.framePublish": frozenset({"mode", "threshold", "fragmentation", "ballastSize"}),
    "engine.framePublish.fragmentation": frozenset({"algorithm", "reedSolomon"}),
    "engine.framePublish.fragmentation.reedSolomon": frozenset({"dataShards", "parityShards"}),
}

# Generation -> dotted path of a mapping -> the names the node reads in it.
# Only top-level sections and mappings listed here are checked.
SECTION_KEYS: dict[str, dict[str, frozenset[str]]] = {
    "1.4": {
        "engine": _ENGINE_1_4 | _FORK_ENGINE_KEYS,
        "p2p": _P2P_1_4,
        "db": _DB_1_4,
    },
    "2.0": {
        "engine": _ENGINE_2_0 | _FORK_ENGINE_KEYS,
        "p2p": _P2P_2_0,
        "db": _DB_1_4,
        **_ENGINE_NESTED,
    },
    "2.1": {
        "engine": _ENGINE_2_1 | _FORK_ENGINE_KEYS,
        "p2p": _P2P_2_1,
        "db": _DB_2_1,
        **_ENGINE_NESTED,
    },
}

# Generation -> dotted key names that it ignores but that are not reported as
# unknown. Configs written by 1.4 or 2.0 nodes carry both keys, and
# legacy_keys() in nodeconfig returns a non-empty engine.dataWorkerMultiaddrs
# so that the caller can warn.
# NOTE: nothing reports a non-zero engine.dataWorkerBaseListenPort in 2.1.
# Keys an older node wrote on first start stay in upgraded configs; the node
# ignores them harmlessly, so they are accepted rather than reported.
_UPGRADE_LEFTOVERS_2_0 = frozenset({"p2p.minPeers"})
_UPGRADE_LEFTOVERS_2_1 = _UPGRADE_LEFTOVERS_2_0 | {"engine.fullProver", "engine.autoMergeCoins"}

IGNORED_KEYS: dict[str, frozenset[str]] = {
    "1.4": frozenset(),
    "2.0": _UPGRADE_LEFTOVERS_2_0,
    "2.1": _UPGRADE_LEFTOVERS_2_1 | {"engine.dataWorkerMultiaddrs", "engine.dataWorkerBaseListenPort"},
}

# Generation -> dotted key name of another generation -> the key to use instead.
# Both 2.1 worker lists map to the one 1.4 list. The 2.1 stream port maps to
# the 1.4 listen port because the master dials each worker on it. A key of
# another generation that is missing here is reported with "remove it".
REPLACEMENTS: dict[str, dict[str, str]] = {
    generation: {
        "engine.dataWorkerP2PMultiaddrs": "dataWorkerMultiaddrs",
        "engine.dataWorkerStreamMultiaddrs": "dataWorkerMultiaddrs",
        "engine.dataWorkerBaseStreamPort": "dataWorkerBaseListenPort",
    }
    for generation in ("1.4", "2.0")
}
