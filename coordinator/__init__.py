"""quil-coord: the cluster's inventory, core assignment and config push.

  home.py      the state directory: settings, inventory, assignment, CA, lock
  inventory.py hosts and their validation
  assign.py    core index assignment (stable, contiguous)
  render.py    the canonical config.yml for the recorded assignment
  client.py    mutual-TLS clients for the agents and the gRPC error table
  apply.py     drive every agent to the recorded assignment
  status.py    collect every host's process table
  bundle.py    agent bundles for hosts added by hand
  demo.py      a local demo cluster on loopback addresses
  cli.py       the quil-coord command line
"""
