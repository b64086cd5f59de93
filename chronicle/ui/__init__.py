"""The web timeline (``chronicle ui``): a local web page over a store's history.

What it shows, all read from the store without a mount (``chronicle.ui.data``
over ``chronicle.store.history.views``, ``points`` and the turn log):

======================================  ==========================================================
route                                   page
======================================  ==========================================================
``GET /``                               the store's agents and workspaces, each as a fork tree
``GET /agents/{agent}``                 the agent's turns, newest first, 50 a page (``?page=N``,
                                        0 the newest): status, time, ms, message, reply, usage,
                                        file events, patch operations
``GET /agents/{agent}/turns/{n}``       one turn: its record, message, reply, error, state patch
                                        (the state before and after, changed values marked),
                                        steps, file events, a unified diff of every file it
                                        changed; its read set and receipt if its record has them
``GET /w/{ws}``                         a workspace: snapshots, the log (50 events a page,
                                        ``?before=SEQ``), the snapshot form
``GET /w/{ws}/file?path=P``             a file's history; ``&a=A&b=B``: the diff of versions A
                                        and B (default: the last two); ``&v=N``: version N
``GET /w/{ws}/tree?at=POINT&path=P``    the tree at a point (a seq, an ISO time, a snapshot or
                                        ``turn:AGENT:N``; default the head): a directory or a file
``GET  /agents/{agent}/rollback?to=N``  confirm, then ``POST`` it: roll the agent back to turn N
``GET  /agents/{agent}/fork?at=N``      confirm (with the new agent's name), then ``POST``: fork
``GET  /w/{ws}/restore?path=P&version=N``  confirm, then ``POST``: restore a file's version
``GET  /w/{ws}/snapshot?name=S``        confirm, then ``POST``: take a snapshot at the head
======================================  ==========================================================

The changes run the CLI's code (:mod:`chronicle.actions`). Who may connect,
the same-origin and CSRF rules, and errors: :mod:`chronicle.ui.app`.

Layers: ``chronicle.ui`` imports the store, ``chronicle.actions`` and
``agent_runtime`` (the coordinator's connection checks, the runtime for
rollbacks); never ``chronicle.fs``, pyfuse3 or trio (it reads no mount), and
nothing below it imports it (``tests/test_layers.py``).

Threads: one asyncio event loop; reads run in worker threads.
"""
