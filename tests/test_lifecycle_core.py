"""The whole life cycle on a fake clock: shutdown order, hand-off, helpers, Consul link,
signals, memory checks.  No process, no socket, no real time."""

from __future__ import annotations

import pytest

from supervisor import proto
from supervisor.lifecycle.actions import Accept, Drain, Exit, Forward, Kill, Measure, Spawn, StartHelper, Tell
from supervisor.lifecycle.core import CONSUL, WATCHER
from supervisor.lifecycle.events import Exited, Measured, SendFailed
from supervisor.lifecycle.pool import Retire
from supervisor.lifecycle.shutdown import RetirePool, Shutdown, StartWithdraw
from supervisor.lifecycle import view
from tests.sim import Sim, notes, running

DRAIN_DELAY = 2.0
WITHDRAW_TIMEOUT = 5.5


def consul_sim(**kw: object) -> Sim:
    return running(2, consul_ttl=9.0, drain_delay=DRAIN_DELAY, withdraw_timeout=WITHDRAW_TIMEOUT, **kw)


def tells(actions: list[object], kind: type) -> list[Tell]:
    return [a for a in actions if isinstance(a, Tell) and isinstance(a.message, kind)]


def assert_withdraw_delay_drain_exit(sim: Sim) -> None:
    """The operational order of a graceful stop, read off the timeline: withdraw from Consul,
    then wait the drain delay, then drain the workers, then exit."""
    withdraw = [t for t, a in sim.timeline if isinstance(a, Tell) and isinstance(a.message, proto.Withdraw)]
    drains = [t for t, a in sim.timeline if isinstance(a, Drain)]
    exits = [t for t, a in sim.timeline if isinstance(a, Exit)]
    assert withdraw, "the service was never withdrawn from Consul"
    assert drains, "the workers were never drained"
    assert exits, "supervise never exited"
    answered = [t for t, a in sim.timeline if getattr(a, "event", None) == "drain_delay"]
    assert answered and answered[0] >= withdraw[0], "the drain delay starts after the withdrawal"
    assert min(drains) >= answered[0] + DRAIN_DELAY, "workers drained before the drain delay was over"
    assert min(exits) >= max(drains)


def stop_gracefully(sim: Sim, consul_answers_after: float | None) -> None:
    """SIGTERM, Consul's answer (or none), then the workers finish and exit."""
    consul = sim.core.helpers[CONSUL].pid
    assert consul is not None
    sim.signal("SIGTERM")
    if consul_answers_after is not None:
        sim.advance(consul_answers_after)
        sim.say(consul, proto.Withdrawn(ok=True))
    for _ in range(10):
        draining = [w.pid for w in sim.pool.workers.values() if w.state == "draining"]
        if draining:
            sim.advance(0.3)  # the in-flight requests take a little while
            sim.exit_all(draining)
        if sim.exited_with is not None:
            return
        sim.advance_to_next_deadline()
    raise AssertionError("the stop never finished")


def test_without_consul_the_stop_delay_keeps_serving_with_health_503_then_drains():
    sim = running(2, stop_delay=3.0)
    actions = sim.signal("SIGTERM")
    assert notes(actions, "drain_delay")[0].fields == {"seconds": 3.0}
    assert not [a for a in actions if isinstance(a, (Drain, Kill))], "nothing drains during the stop delay"
    assert not sim.core.can_serve(sim.now), "health answers 503 from the first step"
    assert not [a for a in sim.advance(2.99) if isinstance(a, (Drain, Kill))]
    drains = [a for a in sim.advance(0.01) if isinstance(a, Drain)]
    assert sorted(d.pid for d in drains) == sim.pids_of(1)
    sim.exit_all(sim.pids_of(1))
    assert sim.exited_with == Exit(0, "shutdown complete")


def test_without_consul_and_no_stop_delay_the_drain_starts_at_once():
    """The control: the default drains at the signal (the delay above is the setting's doing)."""
    sim = running(2)
    drains = [a for a in sim.signal("SIGTERM") if isinstance(a, Drain)]
    assert sorted(d.pid for d in drains) == sim.pids_of(1)


def test_a_second_sigterm_during_the_stop_delay_kills_at_once():
    sim = running(2, stop_delay=30.0)
    sim.signal("SIGTERM")
    assert sorted(a.pid for a in sim.signal("SIGTERM") if isinstance(a, Kill)) == sim.pids_of(1)


def test_shutdown_withdraws_then_waits_the_drain_delay_then_drains_then_exits():
    sim = consul_sim()
    consul = sim.core.helpers[CONSUL].pid
    actions = sim.signal("SIGTERM")
    assert tells(actions, proto.Withdraw) == [Tell(consul, proto.Withdraw(serving=True))]
    assert not [a for a in actions if isinstance(a, (Drain, Kill))], "nothing drains before Consul answers"
    assert not sim.core.can_serve(sim.now), "health answers 503 from the first step"
    sim.advance(0.4)
    actions = sim.say(consul, proto.Withdrawn(ok=True))
    assert notes(actions, "drain_delay")[0].fields == {"seconds": DRAIN_DELAY}
    assert not [a for a in sim.advance(DRAIN_DELAY - 0.01) if isinstance(a, Drain)]
    drains = [a for a in sim.advance(0.01) if isinstance(a, Drain)]
    assert sorted(d.pid for d in drains) == sim.pids_of(1)
    sim.exit_all(sim.pids_of(1))
    assert sim.exited_with == Exit(0, "shutdown complete")
    assert_withdraw_delay_drain_exit(sim)


def test_a_silent_consul_delays_the_drain_by_the_withdraw_timeout_only():
    sim = consul_sim()
    stop_gracefully(sim, consul_answers_after=None)
    assert_withdraw_delay_drain_exit(sim)
    first_drain = min(t for t, a in sim.timeline if isinstance(a, Drain))
    assert first_drain == pytest.approx(WITHDRAW_TIMEOUT + DRAIN_DELAY)


def test_negative_control_the_order_check_catches_draining_before_withdrawing(monkeypatch):
    """A shutdown machine that drains at once (and withdraws afterwards) must fail the check."""
    def drain_first(self, now, signal, registered):
        self._enter(self.phase.__class__.DRAINING, None)
        return [RetirePool(Retire.GRACEFUL), StartWithdraw()]

    monkeypatch.setattr(Shutdown, "stop", drain_first)
    sim = consul_sim()
    stop_gracefully(sim, consul_answers_after=0.1)
    with pytest.raises(AssertionError, match="drain"):
        assert_withdraw_delay_drain_exit(sim)


def test_stop_without_consul_drains_at_once():
    sim = running(2)
    drains = [a for a in sim.signal("SIGTERM") if isinstance(a, Drain)]
    assert len(drains) == 2


def test_stop_while_the_consul_helper_is_down_restarts_it_to_withdraw_first():
    sim = consul_sim()
    consul = sim.core.helpers[CONSUL].pid
    sim.exit(consul, "signal 9 (SIGKILL)")
    actions = sim.signal("SIGTERM")
    new_consul = sim.core.helpers[CONSUL].pid
    assert StartHelper(CONSUL) in actions and new_consul not in (None, consul)
    assert tells(actions, proto.Withdraw) == [Tell(new_consul, proto.Withdraw(serving=True))]
    assert not tells(actions, proto.Register), "a helper started to withdraw does not register"
    assert not [a for a in actions if isinstance(a, Drain)]


def test_second_stop_signal_is_fast():
    sim = consul_sim()
    sim.signal("SIGTERM")
    actions = sim.signal("SIGTERM")
    assert len([a for a in actions if isinstance(a, Kill)]) == 2
    assert notes(actions, "fast_shutdown")[0].fields["why"] == "second stop signal"


def test_registration_follows_readiness_and_heartbeats_follow_the_clock():
    sim = Sim(2, consul_ttl=9.0)
    sim.start()
    consul = sim.core.helpers[CONSUL].pid
    assert not tells(sim.log, proto.Register), "never registered before a generation is ready"
    actions = sim.ready_all(1)
    assert tells(actions, proto.Register) == [Tell(consul, proto.Register({}))]
    assert tells(actions, proto.Alive)
    assert not tells(sim.advance(2.9), proto.Alive)
    assert tells(sim.advance(0.1), proto.Alive), "Alive every ttl/3"
    # a reload's outcome is a note on the check, never a re-registration
    sim.reload()
    actions = sim.ready_all(2)
    assert tells(actions, proto.Note) == [Tell(consul, proto.Note("generation 2 serving"))]
    assert not tells(actions, proto.Register)


def test_a_restarted_consul_helper_registers_again():
    sim = consul_sim()
    old = sim.core.helpers[CONSUL].pid
    actions = sim.exit(old, "exit 1")
    assert notes(actions, "helper_exited")[0].fields["restart_in"] == 0.5
    actions = sim.advance(0.5)
    new = sim.core.helpers[CONSUL].pid
    assert StartHelper(CONSUL) in actions and new != old
    assert tells(actions, proto.Register) == [Tell(new, proto.Register({}))]


def test_helper_restarts_back_off_and_stop_during_shutdown():
    sim = running(1, watcher=True)
    delays = []
    for _ in range(4):
        pid = sim.core.helpers[WATCHER].pid
        before = sim.now
        sim.exit(pid, "exit 1")
        sim.advance_to_next_deadline()
        assert sim.core.helpers[WATCHER].pid not in (None, pid)
        delays.append(sim.now - before)
    assert delays == [0.5, 1.0, 2.0, 4.0]
    sim.signal("SIGTERM")
    actions = sim.exit(sim.core.helpers[WATCHER].pid, "exit 1")
    assert not notes(actions, "helper_exited") and sim.core.helpers[WATCHER].start_at is None


def test_code_changes_are_debounced_into_one_reload():
    sim = running(1, watcher=True)
    watcher = sim.core.helpers[WATCHER].pid
    for i in range(5):
        sim.say(watcher, proto.Changed([f"a{i}.py"]))
        sim.advance(0.1)
    assert not notes(sim.log, "reload_started")
    actions = sim.advance(0.2)
    assert notes(actions, "code_changed")[0].fields["count"] == 5
    assert [a for a in actions if isinstance(a, Spawn)] == [Spawn(2, 1)]


def test_kv_change_reloads_with_the_new_environment():
    sim = consul_sim()
    consul = sim.core.helpers[CONSUL].pid
    actions = sim.say(consul, proto.KVChanged({"COLOR": "blue"}, 7))
    assert notes(actions, "config_changed")[0].fields["keys"] == ["COLOR"]
    assert [a.env for a in actions if isinstance(a, Spawn)] == [{"COLOR": "blue"}] * 2
    assert not [a for a in sim.say(consul, proto.KVChanged({"COLOR": "blue"}, 8)) if isinstance(a, Spawn)]


def test_consul_reports_reach_the_health_view():
    sim = consul_sim()
    consul = sim.core.helpers[CONSUL].pid
    sim.say(consul, proto.Registered("web-1"))
    sim.say(consul, proto.ConsulDown("cannot reach Consul"))
    healthy, body = view.health(sim.core, sim.now, 0.0, 1, lambda pid: None)
    assert healthy
    assert body["consul"] == {"service_id": "web-1", "registered": True, "reachable": False,
                              "error": "cannot reach Consul"}
    sim.say(consul, proto.ConsulUp())
    assert view.health(sim.core, sim.now, 0.0, 1, lambda pid: None)[1]["consul"]["reachable"] is True


def test_a_late_connection_is_forwarded_to_the_newest_generation():
    sim = running(2)
    old = sim.pids_of(1)
    sim.reload()
    sim.ready_all(2)
    new = sim.pids_of(2)
    sim.pool.heartbeat(sim.now, new[0], requests=50)
    actions = sim.say(old[0], proto.Handoff(), fd=42)
    assert actions == [Forward(42, old[0], new[1])]


def test_a_descriptor_from_anything_but_a_worker_is_closed():
    sim = running(1, watcher=True)
    watcher = sim.core.helpers[WATCHER].pid
    assert sim.say(watcher, proto.Handoff(), fd=9) == [Forward(9, watcher, None)]


def test_signals_without_a_meaning_are_logged_and_ignored():
    sim = running(1)
    actions = sim.signal("SIGUSR1")
    assert notes(actions, "signal_ignored")[0].fields == {"signal": "SIGUSR1"}
    assert not [a for a in actions if isinstance(a, (Kill, Drain, Spawn))]


def test_memory_over_max_rss_recycles_through_ready_before_retire():
    sim = running(1, max_rss=100 << 20)
    pid = sim.pids_of(1)[0]
    actions = sim.advance(5.0)
    assert Measure((pid,)) in actions
    assert not [a for a in sim.handle(Measured(pid, 50 << 20)) if isinstance(a, Spawn)]
    actions = sim.handle(Measured(pid, 200 << 20))
    assert Spawn(1, 1) in actions and not [a for a in actions if isinstance(a, Drain)]
    new = [p for p in sim.pids_of(1) if p != pid][0]
    sim.pool.ready(sim.now, new)
    actions = sim.step()
    assert actions.index(Drain(pid, "recycle")) < actions.index(Accept(new))


def test_a_worker_whose_channel_broke_is_killed_and_replaced():
    sim = running(1)
    pid = sim.pids_of(1)[0]
    actions = sim.handle(SendFailed(pid))
    assert [a for a in actions if isinstance(a, Kill)] == [Kill(pid, "its channel to the master broke")]
    assert Spawn(1, 1) in sim.exit(pid, "signal 9 (SIGKILL)")


def test_unknown_children_are_reaped_quietly():
    sim = running(1)
    actions = sim.handle(Exited(99999, "exit 0"))
    assert notes(actions, "orphan_reaped") and not [a for a in actions if isinstance(a, Spawn)]


# --------------------------------------------------------------------------- hostile-operator cases


def test_a_paused_master_gives_workers_a_fresh_heartbeat_period():
    sim = running(2, worker_timeout=5.0)
    sim.core.next_deadline()  # what the master asks before it sleeps
    actions = sim.advance(8.0)  # SIGSTOP for 8 s: no heartbeat could be read
    assert notes(actions, "master_was_paused") and not [a for a in actions if isinstance(a, Kill)]
    kills = [a for a in sim.advance(5.0) if isinstance(a, Kill)]
    assert len(kills) == 2, "workers that stay silent after the pause are still judged"


def test_negative_control_without_the_pause_check_healthy_workers_are_killed():
    sim = running(2, worker_timeout=5.0)
    # The master did not promise a deadline (as if it never looked): no pause can be noticed.
    actions = sim.advance(8.0)
    assert len([a for a in actions if isinstance(a, Kill)]) == 2


def test_sigpwr_is_a_graceful_stop_and_other_signals_are_ignored_and_logged_once_per_interval():
    sim = running(1)
    for _ in range(50):
        sim.signal("SIGALRM")
    logged = notes(sim.log, "signal_ignored")
    assert len(logged) == 1 and logged[0].fields == {"signal": "SIGALRM"}
    sim.advance(10.0)
    assert notes(sim.signal("SIGALRM"), "signal_ignored")[0].fields["not_logged"] == 49
    assert not notes(sim.signal("SIGTTIN"), "signal_ignored")  # live scaling (below)
    assert [a for a in sim.signal("SIGPWR") if isinstance(a, Drain)]


def test_a_worker_that_served_is_respawned_at_once_however_often_requests_crash_it():
    sim = running(2)
    for _ in range(6):
        pid = sim.pids_of(1)[0]
        sim.pool.heartbeat(sim.now, pid, requests=1)
        actions = sim.exit(pid, "exit 7")
        assert [a for a in actions if isinstance(a, Spawn)] == [Spawn(1, 1)] or Spawn(1, 2) in actions
        assert not notes(actions, "worker_backoff")
        sim.ready_all(1)


def test_negative_control_a_worker_that_never_served_backs_off():
    sim = running(1)
    delays = []
    for _ in range(3):
        actions = sim.exit(sim.pids_of(1)[0], "exit 1")
        backoff = notes(actions, "worker_backoff")
        delays += [n.fields["delay"] for n in backoff]
        if backoff:
            sim.advance(backoff[0].fields["delay"])
        sim.ready_all(1)
    assert delays == [0.5, 1.0]


def test_boots_are_bounded_so_a_stop_signal_is_handled_in_the_next_turn():
    sim = Sim(40, boot_concurrency=8)
    spawns = [a for a in sim.start() if isinstance(a, Spawn)]
    assert len(spawns) == 8, "at most boot_concurrency workers import at once"
    actions = sim.signal("SIGTERM")
    assert not [a for a in actions if isinstance(a, Spawn)]
    assert len([a for a in actions if isinstance(a, Kill)]) == 8
    sim.exit_all(sim.pids_of(1))
    assert sim.exited_with == Exit(0, "shutdown complete")


def test_health_needs_a_worker_that_can_take_a_request():
    sim = running(2, threads=2)
    a, b = sim.pids_of(1)
    assert sim.core.can_serve(sim.now)
    sim.pool.heartbeat(sim.now, a, requests=5, busy=2)  # both threads busy
    sim.advance(3.5)  # b's loop is silent: stuck in a request
    sim.pool.heartbeat(sim.now, a, requests=5, busy=2)
    healthy, body = view.health(sim.core, sim.now, 0.0, 1, lambda pid: None)
    assert not healthy and body["status"] == "unavailable" and body["available_workers"] == 0
    sim.pool.heartbeat(sim.now, a, requests=6, busy=1)
    assert view.health(sim.core, sim.now, 0.0, 1, lambda pid: None)[0]


def test_health_is_503_while_every_slot_waits_to_respawn():
    sim = running(1)
    sim.exit(sim.pids_of(1)[0], "exit 1")  # never served: a backoff may follow
    healthy, body = view.health(sim.core, sim.now, 0.0, 1, lambda pid: None)
    assert not healthy and body["workers"] == [] or body["available_workers"] == 0


# --------------------------------------------------------------------------- one generation, one code


def test_a_respawn_that_loads_other_code_is_not_swapped_in_and_a_reload_follows():
    sim = running(2)
    sim.pool.generations[1].code = "v1"
    crashed = sim.pids_of(1)[0]
    sim.pool.heartbeat(sim.now, crashed, requests=1)
    sim.exit(crashed, "exit 7")
    (respawn,) = sim.pids_of(1, "starting")
    sim.pool.ready(sim.now, respawn, code="v2")  # the code on disk changed since generation 1 booted
    actions = sim.step()
    assert Kill(respawn, "it loaded other code than its generation runs") in actions
    assert Accept(respawn) not in actions
    assert notes(actions, "code_changed_under_generation")
    actions = sim.exit(respawn, "signal 9 (SIGKILL)")
    assert [a for a in actions if isinstance(a, Spawn)] == [Spawn(2, 1), Spawn(2, 2)], "a whole new generation"


def test_negative_control_a_respawn_with_the_same_code_is_swapped_in():
    sim = running(2)
    crashed = sim.pids_of(1)[0]
    sim.pool.generations[1].code = "v1"
    sim.exit(crashed, "exit 7")
    respawn = [p for p in sim.pids_of(1, "starting")][0]
    sim.pool.ready(sim.now, respawn, code="v1")
    assert Accept(respawn) in sim.step()


def test_code_that_changes_while_a_generation_boots_supersedes_it():
    sim = running(2)
    sim.reload()
    a, b = sim.pids_of(2)
    sim.pool.ready(sim.now, a, code="v2")
    sim.pool.ready(sim.now, b, code="v3")  # deployed again while generation 2 booted
    actions = sim.step()
    assert {k.pid for k in actions if isinstance(k, Kill)} == {a, b}
    assert sim.pool.generations[2].state == "superseded" and sim.pool.pending is not None
    actions = sim.exit_all([a, b])
    assert [s for s in actions if isinstance(s, Spawn)] == [Spawn(3, 1), Spawn(3, 2)]


def test_each_drain_says_why_so_websockets_can_close_with_the_right_code():
    sim = running(2)
    sim.reload()
    actions = sim.ready_all(2)
    assert sorted(a.why for a in actions if isinstance(a, Drain)) == ["reload", "reload"]
    actions = sim.signal("SIGTERM")
    actions += sim.advance_to_next_deadline()  # past the Consul-less drain delay, if any
    assert {a.why for a in sim.log if isinstance(a, Drain)} == {"reload", "shutdown"}
