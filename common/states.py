"""Lifecycle states of one supervised process.

The names match the ProcessState enum of proto/agent.proto without its
PROCESS_STATE_ prefix; tests/test_proto.py::test_states_match_process_state_enum
checks that they agree.

  STOPPED  -> STARTING   spawned
  STARTING -> RUNNING    stayed up for the start time, or listens on its address
  STARTING -> BACKOFF    exited before it counted as started
  RUNNING  -> BACKOFF    exited unexpectedly; restarted after a delay
  BACKOFF  -> STARTING   the delay passed
  BACKOFF  -> FATAL      too many failed starts in the crash-loop window
  *        -> STOPPING   asked to stop; SIGTERM sent to its process group
  STOPPING -> STOPPED    exited after the stop request
  EXITED                 exited and not restarted (not in the desired state)
  STOPPED  -> WAITING    a bind address is on no interface yet (not a failure)
  BACKOFF  -> WAITING    the same, at a restart
  WAITING  -> STARTING   its bind address appeared on an interface
  WAITING  -> BACKOFF    the address appeared, but another process holds the port
"""

from __future__ import annotations

import enum


class State(enum.Enum):
    STOPPED = "stopped"
    STARTING = "starting"
    RUNNING = "running"
    BACKOFF = "backoff"
    STOPPING = "stopping"
    EXITED = "exited"
    FATAL = "fatal"
    WAITING = "waiting"


# A process in one of these states has a live pid.
ALIVE_STATES = frozenset({State.STARTING, State.RUNNING, State.STOPPING})

# Start of the status detail of a core kept stopped by quil-coord stop (ProcessStatus.held marks it too).
HELD_DETAIL = "held by quil-coord stop"
