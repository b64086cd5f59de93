"""What ``chronicle fsck`` reports: problems and counters (see ``fsck``)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from chronicle.store.chunks.ids import to_hex

ERROR, WARNING, INFO = "error", "warning", "info"

_NAMED_IN_MESSAGE = 5          # affected file versions spelled out in a message
_NAMED_IN_DETAILS = 1000       # ... and listed in its details


@dataclass
class Problem:
    """One finding. ``kind`` is a short slug (``chunk-corrupt``,
    ``content-refcount``, ...), ``message`` one line for the user,
    ``details`` machine-readable facts (ids, files) for ``--json``."""

    kind: str
    message: str
    severity: str = ERROR
    repaired: bool = False
    details: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        out = {"kind": self.kind, "severity": self.severity, "message": self.message, "repaired": self.repaired}
        if self.details:
            out["details"] = self.details
        return out


@dataclass
class FsckReport:
    """What :func:`fsck` found. Byte counters are bytes on disk (stored,
    i.e. compressed) unless named otherwise."""

    problems: list[Problem] = field(default_factory=list)
    repair: bool = False
    workspaces: int = 0
    packs: int = 0
    pack_bytes: int = 0
    chunks: int = 0
    bytes_checked: int = 0          # chunk payload bytes read and verified against their hash
    unreferenced_bytes: int = 0     # pack bytes no index entry points at (GC reclaims them)
    contents: int = 0
    content_bytes_checked: int = 0  # file bytes re-hashed (verify_contents)
    inodes: int = 0
    dirents: int = 0
    path_entries: int = 0
    events: int = 0
    metadata_rebuilt: str | None = None   # repair rebuilt the metadata: where the damaged file is kept
    metadata_lost: dict[str, int] = field(default_factory=dict)      # ... records lost per database
    metadata_derived: dict[str, int] = field(default_factory=dict)   # ... records derived again per database
    metadata_in_use: str = "live"         # or the backup generation Store.open fell back to (meta.backup)
    metadata_backups: int = 0             # backup generations kept in meta-backup/
    metadata_backup_newest: str | None = None
    seconds: float = 0.0

    @property
    def clean(self) -> bool:
        """No error or warning is left unrepaired."""
        return not any(p.severity != INFO and not p.repaired for p in self.problems)

    def count(self, severity: str, *, unrepaired: bool = True) -> int:
        return sum(1 for p in self.problems if p.severity == severity and not (unrepaired and p.repaired))

    def as_dict(self) -> dict:
        out = {"clean": self.clean, "errors": self.count(ERROR), "warnings": self.count(WARNING),
               "repaired": sum(1 for p in self.problems if p.repaired)}
        out.update((f.name, getattr(self, f.name)) for f in fields(self) if f.name != "problems")
        out["seconds"] = round(self.seconds, 3)
        out["problems"] = [p.as_dict() for p in self.problems]
        return out


def _short(ident: bytes) -> str:
    return to_hex(ident)[:16]


def _name_files(files: list[dict]) -> str:
    """``w:a/b.txt v3, w2:c v1 and 4 more`` for a message."""
    if not files:
        return ""
    parts = []
    for f in files[:_NAMED_IN_MESSAGE]:
        version = f"v{f['version']}" if f["version"] is not None else f"seq {f['seq']}"
        parts.append(f"{f['workspace']}:{f['path']} {version}")
    more = len(files) - _NAMED_IN_MESSAGE
    return ", ".join(parts) + (f" and {more} more" if more > 0 else "")
