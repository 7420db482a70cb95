"""quil-cluster: run one Quilibrium node across many machines.

Layout of the installed package (each subpackage is a top-level folder of
the repository):
  quil_cluster.agent        quil-agent: per-host gRPC service that supervises
                            the node's processes (folder agent/)
  quil_cluster.coordinator  quil-coord: inventory, core assignment, config
                            rendering and push (folder coordinator/)
  quil_cluster.common       code both sides share: node config handling,
                            TLS identities, states, errors (folder common/)
  quil_cluster.proto        the agent API and its generated modules (proto/)
  quil_cluster.simnode      quil-simnode, the stand-in node binary for tests
                            and the demo
"""

__version__ = "0.1.0"
