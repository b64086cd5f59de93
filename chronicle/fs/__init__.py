"""The FUSE adapter (``operations``, ``magic``, ``ctl``) and its daemon (``daemon``)."""

# Mount options that are the daemon's own, taken out before libfuse sees the rest
# (``chronicle.mounting.FUSE_OPTIONS`` accepts them): ``writeback_cache`` asks the kernel to
# cache writes (libfuse 3's FUSE_CAP_WRITEBACK_CACHE, as JuiceFS's ``-o writeback_cache``;
# ``ChronicleOperations.enable_writeback_cache``, README "The writeback cache").
DAEMON_OPTIONS = frozenset({"writeback_cache"})
