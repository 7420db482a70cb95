"""Code shared by the agent and the coordinator.

  errors.py      the exception tree every expected failure raises
  states.py      process lifecycle states, matching the protobuf enum
  nodeconfig.py  parse, validate and render the node's config.yml
  nodekeys.py    the config keys each node generation reads
  firewall.py    nftables and ufw rules for the worker ports
  files.py       atomic file replacement
  multiaddr.py   the /ip4|ip6/ADDR/tcp/PORT multiaddrs the node uses
  pki.py         the cluster CA, certificates and identities in them
  tls.py         gRPC credentials and the peer identity of a call
"""
