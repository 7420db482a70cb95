"""Core index assignment: the manual guide's topology, stability, schemes and bad input."""

import pytest

from quil_cluster.common.errors import InventoryError
from quil_cluster.coordinator.assign import Ports, Slot, assign
from quil_cluster.coordinator.inventory import Host

GLOBAL = Ports("global", 40000)
PER_HOST = Ports("per-host", 40000)


def _hosts():
    control = Host("A", "192.0.2.10", "192.0.2.10:7350", control=True, reserve=1, cpus=4)
    worker = Host("B", "192.0.2.11", "192.0.2.11:7350", workers=4)
    return [control, worker]


def _counts(hosts):
    return {h.name: h.worker_count(h.cpus) for h in hosts}


def _ports(slots, base=40000):
    return [(s.core, s.host, base + s.offset) for s in slots]


def test_assign_manual_guide_topology():
    hosts = _hosts()
    plan = assign(hosts, _counts(hosts), [], GLOBAL)
    assert _ports(plan.slots) == [
        (1, "A", 40000), (2, "A", 40001), (3, "A", 40002),
        (4, "B", 40003), (5, "B", 40004), (6, "B", 40005), (7, "B", 40006),
    ]
    assert plan.added == [1, 2, 3, 4, 5, 6, 7]


def test_assign_new_host_appends_cores():
    hosts = _hosts()
    first = assign(hosts, _counts(hosts), [], GLOBAL)
    hosts.append(Host("C", "192.0.2.13", "192.0.2.13:7350", workers=10))
    second = assign(hosts, _counts(hosts), first.slots, GLOBAL)
    assert second.slots[:7] == first.slots
    assert _ports(second.slots[7:]) == [(core, "C", 40000 + core - 1) for core in range(8, 18)]
    assert second.added == list(range(8, 18))
    assert second.moved == []
    assert second.removed == []


def test_assign_per_host_counts_ports_from_base():
    hosts = _hosts()
    plan = assign(hosts, _counts(hosts), [], PER_HOST)
    assert _ports(plan.slots) == [
        (1, "A", 40000), (2, "A", 40001), (3, "A", 40002),
        (4, "B", 40000), (5, "B", 40001), (6, "B", 40002), (7, "B", 40003),
    ]


def test_assign_grown_host_appends_at_end():
    hosts = _hosts()
    first = assign(hosts, _counts(hosts), [], PER_HOST)
    hosts[0].reserve, hosts[0].workers = None, 5
    second = assign(hosts, _counts(hosts), first.slots, PER_HOST)
    assert second.slots[:7] == first.slots
    assert _ports(second.slots[7:]) == [(8, "A", 40003), (9, "A", 40004)]


def test_assign_removed_middle_host_moves_fewest_cores():
    hosts = _hosts() + [Host("C", "192.0.2.13", "192.0.2.13:7350", workers=10)]
    first = assign(hosts, _counts(hosts), [], GLOBAL)
    remaining = [hosts[0], hosts[2]]
    second = assign(remaining, _counts(remaining), first.slots, GLOBAL)
    # cores 14-17 of C fill the gap 4-7 left by B; cores 8-13 stay where they are
    assert [(s.core, s.host) for s in second.slots] == [(c, "A") for c in (1, 2, 3)] + [(c, "C") for c in range(4, 14)]
    assert second.removed == [14, 15, 16, 17]
    assert second.moved == [4, 5, 6, 7]
    assert second.moved_from == {4: "B", 5: "B", 6: "B", 7: "B"}
    kept = {s.core: s for s in second.slots}
    assert all(kept[c] == first.slots[c - 1] for c in range(8, 14))


def test_assign_removed_host_per_host_ports_stay():
    hosts = _hosts() + [Host("C", "192.0.2.13", "192.0.2.13:7350", workers=2)]
    first = assign(hosts, _counts(hosts), [], PER_HOST)
    remaining = [hosts[0], hosts[2]]
    second = assign(remaining, _counts(remaining), first.slots, PER_HOST)
    assert [(s.core, s.host, 40000 + s.offset) for s in second.slots] == [
        (1, "A", 40000), (2, "A", 40001), (3, "A", 40002), (4, "C", 40000), (5, "C", 40001)]
    assert second.removed == [6, 7, 8, 9]
    assert second.moved == [4, 5]


def test_assign_shrunk_host_fills_gap_from_the_end():
    hosts = _hosts() + [Host("C", "192.0.2.13", "192.0.2.13:7350", workers=3)]
    first = assign(hosts, _counts(hosts), [], PER_HOST)
    hosts[1].workers = 2
    second = assign(hosts, _counts(hosts), first.slots, PER_HOST)
    assert [(s.core, s.host) for s in second.slots] == [
        (1, "A"), (2, "A"), (3, "A"), (4, "B"), (5, "B"), (6, "C"), (7, "C"), (8, "C")]
    assert second.moved == [6, 7]
    assert second.removed == [9, 10]


def test_assign_is_stable_when_nothing_changed():
    hosts = _hosts()
    first = assign(hosts, _counts(hosts), [], GLOBAL)
    again = assign(hosts, _counts(hosts), first.slots, GLOBAL)
    assert again.slots == first.slots
    assert not again.changed


def test_assign_without_control_host_fails():
    hosts = [Host("B", "192.0.2.11", "192.0.2.11:7350", workers=4)]
    with pytest.raises(InventoryError) as err:
        assign(hosts, _counts(hosts), [], GLOBAL)
    assert str(err.value) == "no control host; mark one with quil-coord host set NAME --control"


def test_assign_port_above_65535_fails():
    hosts = _hosts()
    with pytest.raises(InventoryError) as err:
        assign(hosts, _counts(hosts), [], Ports("global", 65530))
    assert str(err.value) == "core 7 on host B would use port 65536; lower the base port 65530"


def test_assign_overlapping_2_1_port_ranges_fail():
    hosts = _hosts()
    with pytest.raises(InventoryError) as err:
        assign(hosts, _counts(hosts), [], Ports("per-host", 25000, 25002))
    assert str(err.value).startswith("cores 1 and 3 would both bind 192.0.2.10:25002;")


def test_reserve_leaving_no_worker_fails():
    host = Host("A", "192.0.2.10", "192.0.2.10:7350", control=True, reserve=2, cpus=2)
    with pytest.raises(InventoryError) as err:
        host.worker_count(2)
    assert str(err.value) == "host A: 2 CPUs minus reserve 2 leaves no worker; lower --reserve"


def test_slot_keeps_offset_when_previous_given():
    hosts = _hosts()
    previous = [Slot(1, "A", "192.0.2.10", 5)]
    plan = assign(hosts, _counts(hosts), previous, PER_HOST)
    assert plan.slots[0] == Slot(1, "A", "192.0.2.10", 5)
    assert [s.offset for s in plan.slots if s.host == "A"] == [5, 0, 1]


GIB = 1024**3


def test_sizing_fixed_count_says_so():
    host = Host("B", "192.0.2.11", "192.0.2.11:7350", workers=4)
    assert host.sizing(None, None, 0) == (4, "4 set with --workers")


def test_sizing_cpus_minus_reserve():
    host = Host("A", "192.0.2.10", "192.0.2.10:7350", control=True)
    assert host.sizing(8, 64 * GIB, 1792 * 1024**2) == (7, "8 logical CPUs - reserve 1")


def test_sizing_capped_by_memory():
    host = Host("A", "192.0.2.10", "192.0.2.10:7350", cpu_basis="physical")
    # 8 GiB - 2 GiB free leaves room for 3 workers of 1792 MiB
    assert host.sizing(16, 8 * GIB, 1792 * 1024**2) == (
        3, "16 physical CPUs - reserve 0, capped to 3 so 3 x 1.8 GiB leaves 2.0 GiB of 8.0 GiB free")


def test_sizing_without_room_for_one_worker_fails():
    host = Host("A", "192.0.2.10", "192.0.2.10:7350")
    with pytest.raises(InventoryError) as err:
        host.sizing(4, 3 * GIB, 1792 * 1024**2)
    assert str(err.value) == ("host A: 3.0 GiB of memory leaves no room for one worker of 1.8 GiB plus 2.0 GiB "
                              "free; lower engine.dataWorkerMemoryLimit or pass --workers")


def test_worker_sizing_uses_physical_basis():
    from quil_cluster.coordinator.cluster import worker_sizing
    from quil_cluster.coordinator.facts import Facts

    hosts = [Host("A", "192.0.2.10", "192.0.2.10:7350", control=True, cpu_basis="physical"),
             Host("B", "192.0.2.11", "192.0.2.11:7350")]
    asked = []

    def facts_of(unknown, required):
        asked.append(([h.name for h in unknown], sorted(required)))
        return {"A": Facts(16, 8, 64 * GIB), "B": Facts(4, 2, 64 * GIB)}

    sizing = worker_sizing(hosts, facts_of, 1792 * 1024**2)
    assert sizing == {"A": (7, "8 physical CPUs - reserve 1"), "B": (4, "4 logical CPUs - reserve 0")}
    assert asked == [(["A", "B"], ["A", "B"])]


def test_assign_200_hosts_of_64_workers():
    hosts = [Host(f"h{i:03d}", f"10.0.{i // 200}.{i % 200 + 1}", f"10.0.{i // 200}.{i % 200 + 1}:7350", workers=64,
                  control=i == 0) for i in range(200)]
    plan = assign(hosts, _counts(hosts), [], PER_HOST)
    assert len(plan.slots) == 12800
    assert _ports(plan.slots)[-1] == (12800, "h199", 40063)
    assert plan.added == list(range(1, 12801))
