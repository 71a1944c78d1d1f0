"""The master process: its loop (selector, fork, signal, send), the health endpoint, and the
plumbing that forks helper processes.  Everything here has effects; the decisions it carries
out are taken by `supervisor.lifecycle`."""
