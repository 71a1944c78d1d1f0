"""A worker process: imports the app, then serves HTTP/1.1 on the inherited sockets.
Runs only in the child the master forks for it (`main.run`)."""
