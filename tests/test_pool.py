"""The generation state machine, replayed with a fake clock and fake processes."""

from __future__ import annotations

import random

from supervisor.lifecycle.actions import Accept, Drain, Exit, Kill, Spawn
from tests.sim import Sim, notes, running


def test_first_generation_accepts_each_worker_as_it_becomes_ready():
    sim = Sim(3)
    spawns = [a for a in sim.start() if isinstance(a, Spawn)]
    assert [(s.generation, s.slot) for s in spawns] == [(1, 1), (1, 2), (1, 3)]
    first = sim.pids_of(1)[0]
    sim.pool.ready(sim.now, first)
    actions = sim.step()
    assert Accept(first) in actions and not notes(actions, "generation_ready")
    actions = sim.ready_all(1)
    assert notes(actions, "generation_ready")[0].fields["first"] is True


def test_reload_drains_old_only_after_whole_new_generation_is_ready_then_accepts():
    sim = running(2)
    old = sim.pids_of(1)
    actions = sim.reload()
    assert [a for a in actions if isinstance(a, Spawn)] == [Spawn(2, 1), Spawn(2, 2)]
    new = sim.pids_of(2)
    sim.pool.ready(sim.now, new[0])
    actions = sim.step()
    assert not [a for a in actions if isinstance(a, (Drain, Accept, Kill))], "nothing moves with half a generation"
    sim.pool.ready(sim.now, new[1])
    actions = sim.step()
    drains = [i for i, a in enumerate(actions) if isinstance(a, Drain)]
    accepts = [i for i, a in enumerate(actions) if isinstance(a, Accept)]
    assert sorted(a.pid for a in actions if isinstance(a, Drain)) == old
    assert sorted(a.pid for a in actions if isinstance(a, Accept)) == new
    assert max(drains) < min(accepts), "old generation stops accepting before the new one starts"
    assert sim.serving() == 2
    # reload_finished waits for the drained generation to be gone, with its drained count
    sim.pool.heartbeat(sim.now, old[0], requests=10, drained=3)
    sim.exit(old[0])
    finished = notes(sim.exit(old[1]), "reload_finished")
    assert finished and finished[0].fields["outcome"] == "succeeded"
    assert finished[0].fields["drained_requests"] == 3
    assert sim.pool.generations[1].state == "stopped"


def test_reload_into_code_that_fails_to_import_leaves_old_generation_untouched():
    sim = running(2)
    old = sim.pids_of(1)
    sim.reload()
    bad = sim.pids_of(2)
    sim.pool.boot_error(sim.now, bad[0], "SyntaxError: invalid syntax (app.py, line 3)")
    actions = sim.exit(bad[0], "exit 3")
    assert Kill(bad[1], "failed") in actions
    assert not [a for a in actions if isinstance(a, Drain)], "the old generation must not be drained"
    failed = notes(actions, "reload_failed")
    assert failed and "SyntaxError" in failed[0].fields["error"]
    assert sim.pool.generations[2].state == "failed"
    assert sim.serving() == 1 and sim.pids_of(1, "serving") == old
    # and the next trigger tries again
    sim.exit(bad[1], "signal 9 (SIGKILL)")
    actions = sim.reload()
    assert [a for a in actions if isinstance(a, Spawn)] == [Spawn(3, 1), Spawn(3, 2)]


def test_reload_that_misses_boot_timeout_fails_and_old_keeps_serving():
    sim = running(2, boot_timeout=5.0)
    sim.reload()
    sim.pool.ready(sim.now, sim.pids_of(2)[0])
    sim.step()
    actions = sim.advance(5.0)
    assert len([a for a in actions if isinstance(a, Kill)]) == 2
    assert "boot timeout" in notes(actions, "reload_failed")[0].fields["error"]
    assert sim.serving() == 1


def test_hup_while_booting_supersedes_and_newest_code_wins():
    sim = running(2)
    sim.reload()
    booting = sim.pids_of(2)
    actions = sim.reload()
    assert {a.pid for a in actions if isinstance(a, Kill)} == set(booting)
    assert not [a for a in actions if isinstance(a, Spawn)], "no third generation while the second is dying"
    actions = sim.exit_all(booting)
    assert [a for a in actions if isinstance(a, Spawn)] == [Spawn(3, 1), Spawn(3, 2)]
    assert notes(sim.log, "reload_finished")[0].fields["outcome"] == "superseded"


def test_file_change_while_booting_queues_exactly_one_more_reload():
    sim = running(2)
    sim.reload(supersede=False)
    for _ in range(5):
        actions = sim.reload(supersede=False)
        assert not [a for a in actions if isinstance(a, (Kill, Spawn))]
    sim.ready_all(2)
    actions = sim.exit_all(sim.pids_of(1))
    assert [a for a in actions if isinstance(a, Spawn)] == [Spawn(3, 1), Spawn(3, 2)]
    sim.ready_all(3)
    sim.exit_all(sim.pids_of(2))
    assert sim.serving() == 3 and sim.pool.pending is None


def test_reload_storm_keeps_at_most_two_generations_alive_and_ends_in_one():
    sim = running(2)
    rng = random.Random(7)
    for _ in range(20):
        sim.reload()
        # some generations get to boot, some are killed early, exits arrive late
        if rng.random() < 0.5:
            sim.ready_all(max(sim.pool.generations))
        for w in list(sim.pool.workers.values()):
            if w.state in ("killed", "draining") and rng.random() < 0.7:
                sim.exit(w.pid)
        sim.advance(0.05)
    while sim.pool.starting_generation() or sim.pool.pending or any(
            w.state in ("killed", "draining") for w in sim.pool.workers.values()):
        sim.ready_all(max(sim.pool.generations))
        for w in list(sim.pool.workers.values()):
            if w.state in ("killed", "draining"):
                sim.exit(w.pid)
        sim.advance(0.05)
    assert sim.max_alive_generations <= 2
    assert sim.pool.alive_generations() == {sim.serving()}


def test_shutdown_during_reload_kills_booting_drains_serving_and_exits_zero():
    sim = running(2)
    sim.reload()
    booting, serving = sim.pids_of(2), sim.pids_of(1)
    actions = sim.signal("SIGTERM")
    assert {a.pid for a in actions if isinstance(a, Kill)} == set(booting)
    assert {a.pid for a in actions if isinstance(a, Drain)} == set(serving)
    sim.exit_all(booting)
    actions = sim.exit_all(serving)
    assert Exit(0, "shutdown complete") in actions


def test_graceful_timeout_kills_a_worker_that_does_not_finish():
    sim = running(1, graceful_timeout=3.0)
    sim.signal("SIGTERM")
    assert not [a for a in sim.advance(2.9) if isinstance(a, Kill)]
    assert sim.pool.next_deadline() == 3.0
    kills = [a for a in sim.advance(0.1) if isinstance(a, Kill)]
    assert kills and "graceful timeout" in kills[0].reason


def test_fast_shutdown_kills_everything():
    sim = running(2)
    actions = sim.signal("SIGQUIT")
    assert len([a for a in actions if isinstance(a, Kill)]) == 2


def test_crash_loop_backs_off_exponentially_and_resets_after_stable_uptime():
    sim = running(1)
    delays = []
    for _ in range(6):
        pid = sim.pids_of(1)[0] if sim.pids_of(1) else None
        assert pid is not None
        before = sim.now
        sim.exit(pid, "exit 1")
        while not sim.pids_of(1):
            sim.advance(max(0.0, (sim.pool.next_deadline() or sim.now) - sim.now))
        delays.append(round(sim.now - before, 3))
        sim.pool.ready(sim.now, sim.pids_of(1)[0])
        sim.step()
    assert delays == [0.0, 0.5, 1.0, 2.0, 4.0, 8.0]
    sim.advance(11.0)  # stable for longer than STABLE_UPTIME
    before = sim.now
    sim.exit(sim.pids_of(1)[0], "exit 1")
    assert sim.pids_of(1) and sim.now == before, "a crash after stable uptime respawns at once"


def test_first_generation_import_error_exits_3():
    sim = Sim(2)
    sim.start()
    pid = sim.pids_of(1)[0]
    sim.pool.boot_error(sim.now, pid, "ModuleNotFoundError: No module named 'nope'")
    actions = sim.exit(pid, "exit 3")
    exits = [a for a in actions if isinstance(a, Exit)]
    assert exits == [Exit(3, "ModuleNotFoundError: No module named 'nope'")]


def test_first_generation_that_never_gets_ready_exits_3_at_boot_timeout():
    sim = Sim(2, boot_timeout=4.0)
    sim.start()
    assert not [a for a in sim.advance(3.9) if isinstance(a, Exit)]
    assert [a for a in sim.advance(0.1) if isinstance(a, Exit)][0].code == 3


def test_silent_worker_is_killed_and_replaced():
    sim = running(1, worker_timeout=5.0)
    pid = sim.pids_of(1)[0]
    sim.advance(4.0)
    sim.pool.heartbeat(sim.now, pid, 1)
    assert not [a for a in sim.advance(4.0) if isinstance(a, Kill)]
    kills = [a for a in sim.advance(1.0) if isinstance(a, Kill)]
    assert kills == [Kill(pid, "no heartbeat for 5s", dump=True)]
    actions = sim.exit(pid, "signal 9 (SIGKILL)")
    assert Spawn(1, 1) in actions


def test_max_requests_recycles_through_ready_before_retire():
    sim = Sim(1, max_requests=100)  # type: ignore[arg-type]
    sim.start()
    sim.ready_all(1)
    old = sim.pids_of(1)[0]
    sim.pool.heartbeat(sim.now, old, 100)
    actions = sim.step()
    assert Spawn(1, 1) in actions and not [a for a in actions if isinstance(a, Drain)]
    new = [p for p in sim.pids_of(1) if p != old][0]
    sim.pool.ready(sim.now, new)
    actions = sim.step()
    assert actions.index(Drain(old, "recycle")) < actions.index(Accept(new))


def test_rolling_reload_never_exceeds_workers_plus_one():
    sim = running(3, rolling=True)
    sim.max_alive_workers = 0
    actions = sim.reload()
    assert [a for a in actions if isinstance(a, Spawn)] == [Spawn(2, 1)]
    for _ in range(3):
        sim.ready_all(2)
        draining = [w.pid for w in sim.pool.workers.values() if w.state == "draining"]
        sim.exit_all(draining)
    assert sim.serving() == 2 and sim.pids_of(1) == []
    assert sim.max_alive_workers == 4
    assert notes(sim.log, "reload_finished")[-1].fields["outcome"] == "succeeded"


def test_rolling_failure_stops_rollout_and_keeps_serving():
    sim = running(2, rolling=True)
    sim.reload()
    sim.ready_all(2)
    sim.exit_all([w.pid for w in sim.pool.workers.values() if w.state == "draining"])
    bad = sim.pids_of(2, "starting")[0]
    actions = sim.exit(bad, "exit 3")
    assert notes(actions, "reload_failed")
    assert all(s.serving is not None for s in sim.pool.slots), "every slot still has a serving worker"


def test_a_late_connection_goes_to_the_newest_generation():
    sim = running(2)
    old = sim.pids_of(1)
    sim.reload()
    sim.ready_all(2)
    new = sim.pids_of(2)
    sim.pool.heartbeat(sim.now, new[0], requests=50)
    assert sim.pool.handoff_target(old[0]) == new[1], "the less busy worker of generation 2"
    assert sim.pool.handoff_target(new[0]) is None, "nothing newer than generation 2"


def test_a_pending_reload_starts_when_every_worker_died_waiting_for_it() -> None:
    """Respawns wait for a pending reload (it refills the slots); the reload must then not wait
    for a serving worker, or a pool whose workers all crashed meanwhile never serves again."""
    sim = running(2)
    a, b = sim.pids_of(1, "serving")
    sim.pool.workers[a].started = 1
    sim.exit(a, "exit 7")  # a request crashed it: respawned at once
    (a2,) = sim.pids_of(1, "starting")
    sim.reload(supersede=False)  # a file change: waits for the respawn to be serving
    sim.exit(b, "exit 7")
    sim.exit(a2, "exit 7")  # the respawn dies too: nobody serves, the reload is pending
    assert len(sim.pids_of(2, "starting")) == 2, "the reload starts and refills every slot"
    sim.ready_all(2)
    assert sim.serving() == 2 and len(sim.pids_of(2, "serving")) == 2
