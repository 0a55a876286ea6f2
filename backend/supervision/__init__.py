"""Spawning and watching backend processes: the command lines, the child process, and the
supervisor's state machine, respawn policy and shutdown ladder. The add-on, `python -m backend
supervise` and the studio's GPU workers use it to keep a `server/` process alive; it talks to
that process over `wire/` (job outcomes too) and never opens a job folder: from `store/` it
uses only the output folder's owner lock."""
