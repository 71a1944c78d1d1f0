"""The code watcher.  `spec` is the master's pure part (what to watch, which paths count);
`helper` is the watcher process, forked by the master."""
