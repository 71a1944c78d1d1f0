"""The master's decisions, as pure state machines.

Nothing in this package forks, sends a signal, opens a socket, reads the clock or sleeps:
the master (`supervisor.master`) feeds it typed events with the current time, asks it what
to do (`Lifecycle.decide`) and when to ask again (`Lifecycle.next_deadline`), and carries
the actions out.  Tests replay event histories on a fake clock
(`tests/test_pool.py`, `tests/test_lifecycle_core.py`).

    core.py        Lifecycle: signals, shutdown, helpers, Consul link and timers around the pool
    pool.py        Pool: slots, workers and generations (reload, recycle, respawn, drain)
    shutdown.py    Shutdown: withdraw from Consul -> drain delay -> drain -> exit
    helpers.py     HelperSlot: when a helper process is (re)started
    consul_link.py ConsulLink: register when ready, heartbeats, notes, withdraw
    debounce.py    Debouncer: a burst of file changes -> one reload
    backoff.py     Backoff: the one capped exponential delay
    actions.py     what the master is asked to do
    events.py      what the master reports
    view.py        the health JSON, from the state
"""
