"""Live scaling on a fake clock: SIGTTIN/SIGTTOU change the worker count, within bounds,
and the count set that way is the one every later generation runs with."""

from __future__ import annotations

from supervisor.lifecycle.actions import Accept, Drain, Kill, Spawn
from tests.sim import notes, running


def spawns(actions: list[object]) -> list[Spawn]:
    return [a for a in actions if isinstance(a, Spawn)]


def test_ttin_adds_a_worker_that_serves_once_ready_without_touching_the_others():
    sim = running(2, max_workers=4)
    before = set(sim.pids_of(1))
    actions = sim.signal("SIGTTIN")
    assert spawns(actions) == [Spawn(1, 3)]
    assert notes(actions, "workers_scaled")[0].fields == {"from": 2, "to": 3, "why": "SIGTTIN"}
    new = (set(sim.pids_of(1)) - before).pop()
    sim.pool.ready(sim.now, new)
    actions = sim.step()
    assert Accept(new) in actions and not [a for a in actions if isinstance(a, (Drain, Kill))]
    assert len(sim.pool.serving_workers()) == 3 and len(sim.pool.slots) == 3


def test_ttou_drains_the_last_worker_and_the_rest_keep_serving():
    sim = running(3, max_workers=4)
    last = sim.pool.slots[2].serving
    actions = sim.signal("SIGTTOU")
    assert [a for a in actions if isinstance(a, Drain)] == [Drain(last, "scale")]
    assert len(sim.pool.slots) == 2 and len(sim.pool.serving_workers()) == 2
    actions = sim.exit(last)  # it finished its requests
    assert not spawns(actions), "a slot scaled away is not refilled"
    assert sim.pool.exits == {"retired": 1}


def test_scaling_stops_at_one_and_at_max_workers_and_says_so():
    sim = running(1, max_workers=2)
    assert notes(sim.signal("SIGTTOU"), "workers_not_scaled")[0].fields == {"from": 1, "to": 1, "why": "SIGTTOU",
                                                                           "limit": 1}
    sim.signal("SIGTTIN")
    assert len(sim.pool.slots) == 2
    assert notes(sim.signal("SIGTTIN"), "workers_not_scaled")[0].fields["limit"] == 2
    assert len(sim.pool.slots) == 2


def test_the_scaled_count_persists_across_reloads():
    sim = running(2, max_workers=8)
    sim.pool.resize(sim.now, 5, "test")
    sim.step()
    sim.ready_all(1)
    actions = sim.reload()
    assert sorted(s.slot for s in spawns(actions)) == [1, 2, 3, 4, 5]
    sim.ready_all(2)
    assert sim.serving() == 2 and len(sim.pool.serving_workers()) == 5
    assert all(w.generation == 2 for w in sim.pool.serving_workers())


def test_negative_control_without_scaling_a_reload_restores_the_configured_count():
    sim = running(2, max_workers=8)
    actions = sim.reload()
    assert sorted(s.slot for s in spawns(actions)) == [1, 2]


def test_scaling_up_during_a_reload_gives_the_new_generation_the_new_slot():
    sim = running(2, max_workers=4)
    sim.reload()
    actions = sim.signal("SIGTTIN")
    assert spawns(actions) == [Spawn(2, 3)]
    sim.ready_all(2)
    assert sim.serving() == 2 and len(sim.pool.serving_workers()) == 3


def test_scaling_down_during_a_reload_kills_the_removed_slots_replacement_and_drains_its_old_worker():
    sim = running(3, max_workers=4)
    old_last = sim.pool.slots[2].serving
    sim.reload()
    booting = {w.slot: w.pid for w in sim.pool.workers.values() if w.generation == 2}
    actions = sim.signal("SIGTTOU")
    assert Kill(booting[3], "scaled down") in actions and Drain(old_last, "scale") in actions
    sim.exit(booting[3], "signal 9 (SIGKILL)")
    sim.ready_all(2)
    assert sim.serving() == 2, "the reload still completes with the smaller count"
    assert len(sim.pool.serving_workers()) == 2


def test_a_spawn_queued_or_landing_after_its_slot_was_removed_never_serves():
    sim = running(2, max_workers=4)
    sim.pool.resize(sim.now, 3, "test")
    sim.pool.resize(sim.now, 2, "test")  # before the master carried the Spawn out
    assert not spawns(sim.step()), "a queued spawn for a removed slot is dropped"
    sim.pool.spawned(sim.now, 1, 3, 999)  # a fork that was already under way
    assert Kill(999, "scaled down") in sim.step()
    assert not spawns(sim.exit(999, "signal 9 (SIGKILL)"))


def test_scaling_is_ignored_once_shutdown_began():
    sim = running(2, max_workers=4)
    sim.signal("SIGTERM")
    assert not spawns(sim.signal("SIGTTIN")) and len(sim.pool.slots) == 2
