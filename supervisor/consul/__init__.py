"""Consul.  `spec` is pure (settings, registration body, KV keys as variables); `client` is the
HTTP client both processes use; `startup` runs in the master once at start (the KV environment);
`helper` is the Consul helper process, forked by the master."""
