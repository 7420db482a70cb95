"""quil-agent: the per-host service that runs the node's processes.

  config.py      the agent's local config file (agent.yaml) and its defaults
  listeners.py   which TCP addresses are listening, read from /proc/net
  supervisor.py  starts, watches, restarts and stops node processes
  reconcile.py   turns a desired state into config writes and process changes
  service.py     the gRPC servicer and build_server()
  cli.py         the quil-agent command line
"""
