"""install-service inside a throwaway root directory: user, venv, directories, units; a second run changes nothing."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from quil_cluster.agent import cli as agent_cli
from quil_cluster.common import install
from quil_cluster.coordinator import cli as coord_cli

REPO = Path(__file__).resolve().parent.parent.parent
VENV = "/opt/quil-cluster/venv"


def _require_root() -> None:
    if os.geteuid() != 0:
        if os.environ.get("CI") == "true":
            pytest.fail("install-service tests need root (chown, useradd --prefix)")
        pytest.skip("install-service tests need root")


def _make_root(path: Path) -> Path:
    """A directory with the account files useradd --prefix edits, holding only root."""
    etc = path / "etc"
    etc.mkdir(parents=True)
    (etc / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
    (etc / "group").write_text("root:x:0:\n")
    for name in ("shadow", "gshadow"):
        (etc / name).write_text("")
        (etc / name).chmod(0o600)
    return path


def _account(root: Path, name: str) -> tuple[int, int]:
    for line in (root / "etc" / "passwd").read_text().splitlines():
        fields = line.split(":")
        if fields[0] == name:
            return int(fields[2]), int(fields[3])
    raise AssertionError(f"{name} not in {root}/etc/passwd")


def _tree(root: Path) -> dict[str, tuple[int, int, int, int]]:
    """Path -> (mode, uid, gid, mtime_ns) of everything outside the venv, to compare two runs."""
    found = {}
    for path in sorted(root.rglob("*")):
        if "opt" in path.relative_to(root).parts[:1]:
            continue
        info = path.lstat()
        found[str(path.relative_to(root))] = (info.st_mode, info.st_uid, info.st_gid, info.st_mtime_ns)
    return found


@pytest.fixture(scope="module")
def agent_root(tmp_path_factory):
    """Run quil-agent install-service twice in one root; keep both outputs and the tree after each."""
    _require_root()
    root = _make_root(tmp_path_factory.mktemp("root"))
    runs = []
    for _ in range(2):
        done = subprocess.run(
            [str(Path(sys.executable).parent / "quil-agent"), "install-service", "--root", str(root), "--firewall",
             "--source", str(REPO)],
            capture_output=True, text=True, timeout=900)
        runs.append((done.returncode, done.stdout, done.stderr, _tree(root)))
    return root, runs


def test_agent_install_first_run_output(agent_root):
    root, runs = agent_root
    code, out, err, _ = runs[0]
    assert (code, err) == (0, "")
    uid, gid = _account(root, "quil")
    assert out.splitlines() == [
        f"created user quil (uid {uid}, gid {gid})",
        f"created {root}/etc/quil-agent (mode 0700)",
        f"created {root}/var/lib/quil-agent (mode 0700)",
        f"created {root}/var/lib/quil-agent/state (mode 0700)",
        f"created {root}/var/lib/quil-agent/node (mode 0700)",
        f"installed quil-cluster 0.1.0 from {REPO} into {root}{VENV}",
        f"wrote {root}/etc/systemd/system/quil-agent.service",
        f"wrote {root}/etc/systemd/system/quil-agent.service.d/firewall.conf",
        "next: put the host's bundle in /etc/quil-agent (agent.yaml, agent.key, agent.crt, ca.crt, owned by quil) "
        f"or run: sudo -u quil {VENV}/bin/quil-agent join ... --dir /etc/quil-agent; "
        "then: systemctl enable --now quil-agent",
    ]


def test_agent_install_second_run_changes_nothing(agent_root):
    root, runs = agent_root
    code, out, err, tree = runs[1]
    assert (code, err) == (0, "")
    assert out.splitlines()[-1] == "nothing changed: already installed"
    assert f"{root}{VENV} has quil-cluster 0.1.0" in out.splitlines()
    assert tree == runs[0][3]


def test_agent_install_user_is_system_account(agent_root):
    root, _ = agent_root
    entry = next(line for line in (root / "etc" / "passwd").read_text().splitlines() if line.startswith("quil:"))
    uid, gid = _account(root, "quil")
    assert entry == f"quil:x:{uid}:{gid}::/var/lib/quil-agent:/usr/sbin/nologin"
    assert uid < 1000
    assert f"quil:x:{gid}:" in (root / "etc" / "group").read_text().splitlines()


def test_agent_install_directories_owned_by_quil(agent_root):
    root, _ = agent_root
    uid, gid = _account(root, "quil")
    for path in ("etc/quil-agent", "var/lib/quil-agent", "var/lib/quil-agent/state", "var/lib/quil-agent/node"):
        info = (root / path).stat()
        assert (info.st_mode & 0o7777, info.st_uid, info.st_gid) == (0o700, uid, gid), path


def test_agent_install_unit_starts_venv_program(agent_root):
    root, _ = agent_root
    unit = root / "etc/systemd/system/quil-agent.service"
    info = unit.stat()
    assert (info.st_mode & 0o7777, info.st_uid, info.st_gid) == (0o644, 0, 0)
    lines = unit.read_text().splitlines()
    assert f"ExecStart={VENV}/bin/quil-agent run --config /etc/quil-agent/agent.yaml" in lines
    assert "User=quil" in lines
    expected = (REPO / "deploy" / "quil-agent.service").read_text().replace("/usr/local/bin/", f"{VENV}/bin/")
    assert unit.read_text() == expected
    drop_in = root / "etc/systemd/system/quil-agent.service.d/firewall.conf"
    assert drop_in.read_text() == (REPO / "deploy" / "quil-agent-firewall.conf").read_text()


def test_agent_install_unit_passes_systemd_analyze(agent_root, tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        if os.environ.get("CI") == "true":
            pytest.fail("systemd-analyze is missing; .ci/run installs the systemd package")
        pytest.skip("systemd-analyze is not installed")
    root, _ = agent_root
    # verify checks that ExecStart's program exists, so point it at the venv inside the root.
    text = (root / "etc/systemd/system/quil-agent.service").read_text().replace(VENV, f"{root}{VENV}")
    unit = tmp_path / "quil-agent.service"
    unit.write_text(text + "\n" + (root / "etc/systemd/system/quil-agent.service.d/firewall.conf").read_text())
    result = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""


def test_agent_install_venv_runs_program(agent_root):
    root, _ = agent_root
    done = subprocess.run([str(root / VENV.lstrip("/") / "bin" / "quil-agent"), "sample-config"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("# quil-agent configuration.")


def test_install_repairs_changed_mode(agent_root, capsys):
    root, _ = agent_root
    state = root / "var/lib/quil-agent/state"
    state.chmod(0o755)
    assert agent_cli.main(["install-service", "--root", str(root), "--firewall", "--source", str(REPO)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert f"set owner and mode 0700 of {state}" in out
    assert out[-1].startswith("next: ")
    assert state.stat().st_mode & 0o7777 == 0o700


def test_coord_install_writes_serve_env(agent_root, capsys):
    root, _ = agent_root
    argv = ["install-service", "--root", str(root), "--source", str(REPO), "--advertise", "192.0.2.10:7351"]
    assert coord_cli.main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    uid, gid = _account(root, "quil-coord")
    assert out[0] == f"created user quil-coord (uid {uid}, gid {gid})"
    assert f"wrote {root}/etc/systemd/system/quil-coord-serve.service" in out
    env = root / "etc/quil-coord/serve.env"
    info = env.stat()
    assert env.read_text() == "QUIL_COORD_ADVERTISE=192.0.2.10:7351\n"
    assert (info.st_mode & 0o7777, info.st_uid, info.st_gid) == (0o640, 0, gid)
    home = (root / "var/lib/quil-coord").stat()
    assert (home.st_mode & 0o7777, home.st_uid, home.st_gid) == (0o700, uid, gid)
    etc = (root / "etc/quil-coord").stat()
    assert (etc.st_mode & 0o7777, etc.st_uid, etc.st_gid) == (0o750, 0, gid)
    assert coord_cli.main(argv) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "nothing changed: already installed"


def test_install_rejects_non_root(monkeypatch, tmp_path):
    monkeypatch.setattr(install.os, "geteuid", lambda: 1000)
    with pytest.raises(install.InstallError) as info:
        install.install(install.AGENT, install.Options(root=tmp_path))
    assert str(info.value) == ("install-service must run as root: it creates a user and writes under /etc and "
                               "/opt; run it with sudo")


def test_install_root_without_passwd_fails(tmp_path, capsys):
    _require_root()
    assert coord_cli.main(["install-service", "--root", str(tmp_path)]) == 3
    assert capsys.readouterr().err == (
        f"error: {tmp_path}/etc/passwd: cannot read it (No such file or directory); --root needs a directory "
        "with etc/passwd, etc/group, etc/shadow and etc/gshadow\n")


def test_run_reports_failed_command():
    with pytest.raises(install.InstallError) as info:
        install._run(["sh", "-c", "echo 'useradd: bad name' >&2; exit 3"])
    assert str(info.value) == "sh -c echo 'useradd: bad name' >&2; exit 3 … failed with exit status 3: useradd: bad name"


def test_run_reports_missing_program():
    with pytest.raises(install.InstallError) as info:
        install._run(["no-such-program-quil"])
    assert str(info.value) == "no-such-program-quil not found; install it and run install-service again"


def test_source_of_this_copy_is_the_checkout():
    assert Path(install.source_of_this_copy()) == REPO
