"""--preload in the pure pool, on a fake clock: a zygote per generation, started before its
workers, whose failure is a failed boot, retired with its generation, replaced when it dies."""

from __future__ import annotations

from supervisor import proto
from supervisor.lifecycle.actions import Exit, Kill, Measure, Spawn, StartZygote
from supervisor.lifecycle.events import Measured, SpawnFailed
from supervisor.lifecycle.pool import GenState, ZygoteState
from tests.sim import Sim, notes


def zygote_pid(sim: Sim, generation: int) -> int:
    z = sim.pool.zygotes[generation]
    assert z.pid is not None
    return z.pid


def preloaded(workers: int = 2, **kw: object) -> Sim:
    sim = Sim(workers, preload=True, **kw)  # type: ignore[arg-type]
    out = sim.start()
    assert [a for a in out if isinstance(a, StartZygote)] == [StartZygote(1, {})]
    assert not [a for a in out if isinstance(a, Spawn)], "no worker before the zygote is ready"
    out = sim.say(zygote_pid(sim, 1), proto.ZygoteReady("c1"))
    spawns = [a for a in out if isinstance(a, Spawn)]
    assert [(s.slot, s.zygote) for s in spawns] == [(i + 1, zygote_pid(sim, 1)) for i in range(workers)]
    sim.ready_all(1)
    assert sim.serving() == 1
    return sim


def test_workers_fork_from_the_generations_zygote_and_a_reload_starts_a_new_one() -> None:
    sim = preloaded()
    out = sim.reload()
    assert [a for a in out if isinstance(a, StartZygote)] == [StartZygote(2, {})]
    assert not [a for a in out if isinstance(a, Spawn)]
    z2 = zygote_pid(sim, 2)
    out = sim.say(z2, proto.ZygoteReady("c2"))
    assert {(a.generation, a.zygote) for a in out if isinstance(a, Spawn)} == {(2, z2)}
    old = sim.pids_of(1)
    z1 = zygote_pid(sim, 1)
    out = sim.ready_all(2)
    assert sim.serving() == 2
    # Generation 1 drains: its zygote is no longer needed.
    assert Kill(z1, "its generation is retired") in out
    assert sim.pool.zygotes[1].state == ZygoteState.STOPPING
    sim.exit_all(old)
    out = sim.exit(z1, "signal 9 (SIGKILL)")
    assert 1 not in sim.pool.zygotes
    assert notes(out, "zygote_exited")[0].level.value == "info"
    assert sim.pool.zygotes[2].state == ZygoteState.READY


def test_a_zygote_that_fails_to_import_at_start_exits_3() -> None:
    sim = Sim(2, preload=True)
    sim.start()
    z = zygote_pid(sim, 1)
    sim.say(z, proto.BootError("ImportError: no module named nope"))
    out = sim.exit(z, "exit 3")
    assert sim.exited_with is not None and sim.exited_with.code == 3
    assert "ImportError" in sim.exited_with.reason
    assert not [a for a in out if isinstance(a, Spawn)]


def test_a_zygote_that_fails_on_reload_leaves_the_old_generation_serving() -> None:
    sim = preloaded()
    serving = sim.pids_of(1, "serving")
    sim.reload()
    z2 = zygote_pid(sim, 2)
    sim.say(z2, proto.BootError("SyntaxError: invalid syntax"))
    out = sim.exit(z2, "exit 3")
    assert sim.pool.generations[2].state == GenState.FAILED
    assert "SyntaxError" in (sim.pool.generations[2].error or "")
    assert notes(out, "reload_failed")
    assert not [a for a in out if isinstance(a, (Spawn, Exit))]
    assert sim.pids_of(1, "serving") == serving and sim.serving() == 1
    # Negative control: a zygote that imports reloads.
    sim.reload()
    z3 = zygote_pid(sim, 3)
    sim.say(z3, proto.ZygoteReady("c3"))
    sim.ready_all(3)
    assert sim.serving() == 3


def test_a_zygote_that_hangs_on_reload_is_killed_at_the_boot_timeout_and_the_reload_fails() -> None:
    sim = preloaded(boot_timeout=10.0)
    sim.reload()
    z2 = zygote_pid(sim, 2)
    sim.advance(9.0)
    assert sim.pool.zygotes[2].state == ZygoteState.STARTING
    out = sim.advance_to_next_deadline()
    assert [a for a in out if isinstance(a, Kill) and a.pid == z2]
    sim.exit(z2, "signal 9 (SIGKILL)")
    assert sim.pool.generations[2].state == GenState.FAILED
    assert "boot timeout" in (sim.pool.generations[2].error or "")
    assert sim.serving() == 1


def test_a_dead_zygote_is_replaced_for_the_next_respawn() -> None:
    sim = preloaded()
    z1 = zygote_pid(sim, 1)
    out = sim.exit(z1, "signal 9 (SIGKILL)")
    assert notes(out, "zygote_exited")[0].level.value == "warning"
    assert not [a for a in out if isinstance(a, StartZygote)], "no zygote until one is needed"
    assert len(sim.pids_of(1, "serving")) == 2, "its workers live on"
    crashed = sim.pids_of(1, "serving")[0]
    out = sim.exit(crashed, "signal 11 (SIGSEGV)")
    assert [a for a in out if isinstance(a, StartZygote)] == [StartZygote(1, {})]
    z = zygote_pid(sim, 1)
    assert z != z1
    out = sim.say(z, proto.ZygoteReady("c1"))
    assert [(a.generation, a.zygote) for a in out if isinstance(a, Spawn)] == [(1, z)]
    sim.ready_all(1)
    assert len(sim.pids_of(1, "serving")) == 2


def test_a_respawn_zygote_that_fails_is_retried_with_backoff() -> None:
    sim = preloaded()
    z1 = zygote_pid(sim, 1)
    sim.exit(z1, "signal 9 (SIGKILL)")
    sim.exit(sim.pids_of(1, "serving")[0], "signal 11 (SIGSEGV)")
    z = zygote_pid(sim, 1)
    out = sim.exit(z, "exit 3")
    assert notes(out, "zygote_failed")[0].fields["retry_in"] == 0  # the first retry is at once
    z = zygote_pid(sim, 1)
    out = sim.exit(z, "exit 3")
    failed = notes(out, "zygote_failed")
    assert failed and failed[0].fields["retry_in"] > 0
    assert not [a for a in out if isinstance(a, StartZygote)]
    assert sim.exited_with is None and sim.serving() == 1
    out = sim.advance_to_next_deadline()
    assert [a for a in out if isinstance(a, StartZygote)] == [StartZygote(1, {})]


def test_a_zygote_lost_while_forking_a_reload_fails_the_reload() -> None:
    sim = preloaded()
    sim.reload()
    z2 = zygote_pid(sim, 2)
    out = sim.say(z2, proto.ZygoteReady("c2"))
    spawn = next(a for a in out if isinstance(a, Spawn))
    # The sim answered Spawned for every Spawn; the master reports a fork the zygote never did.
    sim.handle(SpawnFailed(2, spawn.slot, "the zygote exited before it forked the worker"))
    assert sim.pool.generations[2].state == GenState.FAILED
    assert sim.serving() == 1


def test_shutdown_stops_the_zygotes_and_waits_for_them() -> None:
    sim = preloaded()
    z1 = zygote_pid(sim, 1)
    out = sim.signal("SIGQUIT")
    assert Kill(z1, "shutdown") in out
    sim.exit_all(sim.pids_of(1))
    assert sim.exited_with is None, "the zygote is still there"
    sim.exit(z1, "signal 9 (SIGKILL)")
    assert sim.exited_with is not None and sim.exited_with.code == 0


def test_threads_alive_in_the_zygote_are_named_in_a_warning() -> None:
    sim = Sim(1, preload=True)
    sim.start()
    out = sim.say(zygote_pid(sim, 1), proto.ZygoteReady("c", ["metrics-pusher"]))
    warned = notes(out, "threads_at_fork")
    assert warned and warned[0].fields["threads"] == ["metrics-pusher"]
    # Negative control: none named, no warning.
    sim = Sim(1, preload=True)
    sim.start()
    assert not notes(sim.say(zygote_pid(sim, 1), proto.ZygoteReady("c")), "threads_at_fork")


def test_without_preload_nothing_changes() -> None:
    sim = Sim(2)
    out = sim.start()
    assert not [a for a in out if isinstance(a, StartZygote)]
    assert [a.zygote for a in out if isinstance(a, Spawn)] == [None, None]


# --------------------------------------------------------------------------- --max-memory

MiB = 1 << 20


def measured(sim: Sim, worker_pss: int, worker_uss: int, zygote_pss: int = 0) -> None:
    for pid in sim.pids_of(sim.serving()):
        sim.memory[pid] = Measured(pid, rss=worker_pss + 10 * MiB, uss=worker_uss, pss=worker_pss,
                                   shared=worker_pss - worker_uss)
    z = sim.pool.zygotes.get(sim.serving())
    if z is not None and z.pid is not None:
        sim.memory[z.pid] = Measured(z.pid, rss=zygote_pss, uss=zygote_pss, pss=zygote_pss, shared=0)


def test_a_reload_that_would_not_fit_the_budget_rolls_and_says_why() -> None:
    sim = Sim(4, max_memory=1000 * MiB)
    sim.start()
    sim.ready_all(1)
    measured(sim, worker_pss=200 * MiB, worker_uss=190 * MiB)  # 800 MiB serving: 1600 with a second generation
    out = sim.reload()
    assert any(isinstance(a, Measure) for a in out), "measured before deciding"
    fallback = notes(out, "reload_strategy_fallback")
    assert fallback and fallback[0].fields["strategy"] == "rolling", out
    assert fallback[0].fields["serving_bytes"] == 800 * MiB
    assert notes(out, "reload_started")[0].fields["strategy"] == "rolling"
    assert len([a for a in out if isinstance(a, Spawn)]) == 1, "one worker at a time"
    for _ in range(4):
        assert len(sim.pool.workers) <= 5
        sim.ready_all(2)
        old = [pid for pid in sim.pids_of(1) if sim.pool.workers[pid].state.value == "draining"]
        sim.exit_all(old)
    assert sim.serving() == 2 and len(sim.pids_of(2, "serving")) == 4


def test_a_reload_that_fits_the_budget_builds_a_whole_generation() -> None:
    # Negative control of the above: the same workers under a budget that fits two generations.
    sim = Sim(4, max_memory=2000 * MiB)
    sim.start()
    sim.ready_all(1)
    measured(sim, worker_pss=200 * MiB, worker_uss=190 * MiB)
    out = sim.reload()
    assert not notes(out, "reload_strategy_fallback")
    assert len([a for a in out if isinstance(a, Spawn)]) == 4


def test_preloaded_generations_count_shared_pages_once() -> None:
    # Four preloaded workers share a 200 MiB heap: PSS ~ 50 + 10 MiB each, the zygote ~ 50 MiB.
    sim = preloaded(4, max_memory=700 * MiB)
    measured(sim, worker_pss=60 * MiB, worker_uss=10 * MiB, zygote_pss=50 * MiB)  # 290 MiB: x2 fits
    out = sim.reload()
    assert not notes(out, "reload_strategy_fallback"), out
    assert [a for a in out if isinstance(a, StartZygote)]


def test_without_a_budget_nothing_is_measured_before_a_reload() -> None:
    sim = Sim(2)
    sim.start()
    sim.ready_all(1)
    out = sim.reload()
    assert not [a for a in out if isinstance(a, Measure)]
    assert len([a for a in out if isinstance(a, Spawn)]) == 2


def test_max_rss_compares_unique_memory_when_preloaded() -> None:
    sim = preloaded(2, max_rss=100 * MiB)
    pid = sim.pids_of(1, "serving")[0]
    # 250 MiB resident, but 240 of it is the zygote's heap: not recycled.
    sim.handle(Measured(pid, rss=250 * MiB, uss=10 * MiB, pss=90 * MiB, shared=240 * MiB))
    assert sim.pool.workers[pid].recycle is None
    sim.handle(Measured(pid, rss=400 * MiB, uss=150 * MiB, pss=200 * MiB, shared=250 * MiB))
    assert sim.pool.workers[pid].recycle == "max-rss (uss 150 MiB)"
    # Negative control: without --preload the resident size counts.
    sim = Sim(2, max_rss=100 * MiB)
    sim.start()
    sim.ready_all(1)
    pid = sim.pids_of(1, "serving")[0]
    sim.handle(Measured(pid, rss=250 * MiB, uss=10 * MiB))
    assert sim.pool.workers[pid].recycle == "max-rss (250 MiB)"


def test_a_superseded_generations_zygote_is_stopped() -> None:
    sim = preloaded()
    sim.reload()
    z2 = zygote_pid(sim, 2)
    out = sim.reload()  # SIGHUP again while generation 2's zygote imports
    assert sim.pool.generations[2].state == GenState.SUPERSEDED
    assert Kill(z2, "its generation is retired") in out
    sim.exit(z2, "signal 9 (SIGKILL)")
    assert [a for a in sim.log if isinstance(a, StartZygote) and a.generation == 3]
    sim.say(zygote_pid(sim, 3), proto.ZygoteReady("c3"))
    sim.ready_all(3)
    assert sim.serving() == 3


def test_a_zygote_whose_channel_broke_is_killed_and_replaced_on_demand() -> None:
    from supervisor.lifecycle.events import SendFailed

    sim = preloaded()
    z1 = zygote_pid(sim, 1)
    out = sim.handle(SendFailed(z1))
    assert [a for a in out if isinstance(a, Kill) and a.pid == z1]
    sim.exit(z1, "signal 9 (SIGKILL)")
    assert sim.serving() == 1 and len(sim.pids_of(1, "serving")) == 2


def test_preloaded_forks_respect_the_boot_concurrency() -> None:
    sim = Sim(6, preload=True, boot_concurrency=2)
    sim.start()
    out = sim.say(zygote_pid(sim, 1), proto.ZygoteReady("c"))
    assert len([a for a in out if isinstance(a, Spawn)]) == 2
    out = sim.ready_all(1)
    assert len([a for a in out if isinstance(a, Spawn)]) == 2


def test_connections_open_in_the_zygote_are_named_in_a_warning() -> None:
    sim = Sim(1, preload=True)
    sim.start()
    out = sim.say(zygote_pid(sim, 1), proto.ZygoteReady("c", [], ["10.0.0.5:5432"]))
    warned = notes(out, "connections_at_fork")
    assert warned and warned[0].fields["peers"] == ["10.0.0.5:5432"]
    sim = Sim(1, preload=True)
    sim.start()
    assert not notes(sim.say(zygote_pid(sim, 1), proto.ZygoteReady("c")), "connections_at_fork")
