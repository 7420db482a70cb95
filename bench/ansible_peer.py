"""The Ansible side of the config push: the same hosts, files and processes, driven by a playbook.

Every simulated host is an inventory host with ansible_connection=local and
variables pointing at its own directories and address. One run does what
`quil-coord apply` does after every host grew by one worker: write the same
config.yml on every host, start the new worker and wait until it listens,
then restart the control process on the control host. Workers started this
way run with --parent-process 0 (detached), since no agent watches them.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from quil_cluster.common import nodeconfig
from quil_cluster.coordinator.demo import DEMO_CONFIG

from harness import Reaper, addresses, free_base

PLAYBOOK = """\
- name: push config.yml and start the new data worker
  hosts: fleet
  gather_facts: false
  tasks:
    - name: write config.yml
      ansible.builtin.copy:
        src: "{{ config_src }}"
        dest: "{{ node_dir }}/config.yml"
        mode: "0600"
    - name: start the new data worker
      ansible.builtin.shell: >-
        setsid {{ binary }} --config {{ node_dir }} --core {{ new_core }} --parent-process 0
        > {{ node_dir }}/../worker-{{ new_core }}.log 2>&1 < /dev/null &
    - name: wait until it listens
      ansible.builtin.wait_for:
        host: "{{ address }}"
        port: "{{ new_port }}"
        timeout: 120

- name: restart the control process
  hosts: control
  gather_facts: false
  tasks:
    - name: stop the old control process, start a new one
      ansible.builtin.shell: |
        kill "$(cat {{ node_dir }}/../control.pid)" 2>/dev/null || true
        setsid {{ binary }} --config {{ node_dir }} --core 0 --parent-process 0 \\
          > {{ node_dir }}/../control.log 2>&1 < /dev/null &
        echo $! > {{ node_dir }}/../control.pid
"""

# Only the config push: a second run with the same file changes nothing.
PUSH_PLAYBOOK = """\
- name: push config.yml
  hosts: fleet
  gather_facts: false
  tasks:
    - name: write config.yml
      ansible.builtin.copy:
        src: "{{ config_src }}"
        dest: "{{ node_dir }}/config.yml"
        mode: "0600"
"""

ANSIBLE_CFG = """\
[defaults]
host_key_checking = False
retry_files_enabled = False
interpreter_python = {python}
local_tmp = {root}/.ansible-local
remote_tmp = {root}/.ansible-remote
forks = 5

[connection]
pipelining = True
"""


class AnsibleFleet:
    def __init__(self, root: Path, count: int, binary: Path, peers_bin: Path, reaper: Reaper,
                 block: int = 78) -> None:
        self.root = root
        self.count = count
        self.binary = binary
        self.peers_bin = peers_bin
        self.reaper = reaper
        self.addresses = addresses(block, count)
        self.names = [f"a{i:03d}" for i in range(count)]
        self.workers = 0
        self.base_port = 0
        self.base = nodeconfig.load((Path(nodeconfig.__file__).parent.parent / "coordinator" / "data"
                                     / DEMO_CONFIG).read_text())

    def create(self, max_workers: int) -> None:
        """Write the directories, ansible.cfg and playbook; start one worker per host and the control process."""
        self.base_port = free_base(self.addresses, max_workers, 44000)
        self.reaper.watch_root(self.root)
        for name in self.names:
            (self.root / "hosts" / name / "node" / ".config").mkdir(parents=True, exist_ok=True)
        (self.root / "playbook.yml").write_text(PLAYBOOK)
        (self.root / "push.yml").write_text(PUSH_PLAYBOOK)
        python = self.peers_bin / "python"
        (self.root / "ansible.cfg").write_text(ANSIBLE_CFG.format(python=python, root=self.root))
        self._write_config(1)
        for index, name in enumerate(self.names):
            node_dir = self._node_dir(name)
            (node_dir / "config.yml").write_bytes((self.root / "config.yml").read_bytes())
            self._detached(node_dir, index + 1)
        control = self._detached(self._node_dir(self.names[0]), 0)
        (self._node_dir(self.names[0]).parent / "control.pid").write_text(f"{control}\n")
        self.workers = 1

    def grow(self, forks: int) -> float:
        """Run the playbook that adds one worker per host; return its wall-clock seconds."""
        self._write_config(self.workers + 1)
        self._write_inventory()
        elapsed = self._run("ansible-playbook", "-f", str(forks), str(self.root / "playbook.yml"))
        self.workers += 1
        return elapsed

    def push_unchanged(self, forks: int) -> float:
        """Push the config every host already has; return the seconds of that no-change run."""
        self._write_inventory()
        return self._run("ansible-playbook", "-f", str(forks), str(self.root / "push.yml"))

    def status(self, forks: int) -> float:
        """List every host's node processes with an ad-hoc command; return its seconds."""
        self._write_inventory()
        return self._run("ansible", "fleet", "-f", str(forks), "-m", "ansible.builtin.command",
                         "-a", "pgrep -a -f {{ node_dir }}")

    def _run(self, program: str, *argv: str) -> float:
        env = dict(os.environ, ANSIBLE_CONFIG=str(self.root / "ansible.cfg"), ANSIBLE_NOCOLOR="1",
                   PATH=f"{self.peers_bin}:{os.environ.get('PATH', '')}")
        command = [str(self.peers_bin / program), "-i", str(self.root / "inventory.ini"), *argv]
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=self.root)
        elapsed = time.perf_counter() - started
        if done.returncode != 0:
            raise RuntimeError(f"{program} exited with {done.returncode}: {done.stdout[-3000:]}")
        return elapsed

    def _write_config(self, workers: int) -> None:
        """config.yml for `workers` per host, in the coordinator's order: cores are appended per round."""
        entries = [f"/ip4/{address}/tcp/{self.base_port + w}" for w in range(workers) for address in self.addresses]
        (self.root / "config.yml").write_text(nodeconfig.render(self.base, "1.4", entries))

    def _write_inventory(self) -> None:
        new_round = self.workers  # 0-based round of the worker being added
        lines = ["[fleet]"]
        for index, (name, address) in enumerate(zip(self.names, self.addresses)):
            lines.append(
                f"{name} ansible_connection=local address={address} node_dir={self._node_dir(name)} "
                f"binary={self.binary} config_src={self.root / 'config.yml'} "
                f"new_core={new_round * self.count + index + 1} new_port={self.base_port + new_round}")
        lines += ["", "[control]", self.names[0]]
        (self.root / "inventory.ini").write_text("\n".join(lines) + "\n")

    def _node_dir(self, name: str) -> Path:
        return self.root / "hosts" / name / "node" / ".config"

    def _detached(self, node_dir: Path, core: int) -> int:
        log_path = node_dir.parent / (f"worker-{core}.log" if core else "control.log")
        with open(log_path, "ab") as output:
            process = subprocess.Popen([str(self.binary), "--config", str(node_dir), "--core", str(core),
                                        "--parent-process", "0"], stdout=output, stderr=output,
                                       stdin=subprocess.DEVNULL, start_new_session=True)
        return process.pid
