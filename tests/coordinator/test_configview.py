"""Secrets in a node config are masked wherever quil-coord shows it."""

from __future__ import annotations

from helpers import DATA

from quil_cluster.coordinator import configview


def test_mask_hides_both_secrets_of_reference_config():
    text = (DATA / "config-1.4.21.yml").read_text()
    masked = configview.mask(text)
    # the header comments of the reference file name the placeholders; no value line may
    assert "peerPrivKey: REPLACE_WITH_ED448_PEER_PRIVKEY_HEX" not in masked
    assert "encryptionKey: REPLACE_WITH_32_BYTE_HEX_KEYSTORE_KEY" not in masked
    assert '  peerPrivKey: "********"\n' in masked
    assert '    encryptionKey: "********"\n' in masked
    assert len(masked.splitlines()) == len(text.splitlines())


def test_mask_leaves_other_lines_alone():
    text = "p2p:\n  listenMultiaddr: /ip4/0.0.0.0/udp/8336/quic-v1\n  peerPrivKey: abc123\n"
    assert configview.mask(text) == 'p2p:\n  listenMultiaddr: /ip4/0.0.0.0/udp/8336/quic-v1\n  peerPrivKey: "********"\n'
