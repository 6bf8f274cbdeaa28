"""dorm's code runner: a Piston-compatible execute API for untrusted snippets.

Process layout (see docs/runner.md):

    gateway ──Unix socket──▶ service (uvloop, HTTP, validation, abuse controls, output capture)
                                 │ SEQPACKET + SCM_RIGHTS (limits and one socket end, never code)
                                 ▼
                             spawner (single-threaded, data-free zygote: forks the sandboxes)
                                 │ spawn_call
                                 ▼
                             sandbox: boot (pid 1, trusted init) ─fork─▶ the program (pid 2)

The request's code, stdin and output never pass through the spawner, so nothing of one request
can be inherited by a sandbox forked for another.
"""
