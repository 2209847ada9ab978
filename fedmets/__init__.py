"""The `fedmets` command-line tool: one entry point over the site, server and simulation sides."""
