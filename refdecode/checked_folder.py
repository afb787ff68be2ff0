"""Checked folders: the one way refdecode writes and reads a folder of its own (a corpus index, an output memory,
Medusa heads).

A checked folder holds one `manifest.json` and one generation subfolder `gen-<16 hex>/` with the data files. The
manifest names the format and its version, the generation, and every data file with its size and SHA-256; the
owner adds its own fields. Older versions of a format may keep their files flat in the folder itself (no
generation): they are still read, and replaced cleanly.

Reading checks the manifest's structure (`read_manifest`) and then every file against it (`verify_files`) before
anything opens a file, so a truncated, tampered, missing or extra file is refused with one sentence
(`FolderFormatError`, a ValueError). Nothing here unpickles or follows a symlink inside a folder.

Writing (`claim`, then `new_generation`) never leaves the folder without a readable generation: a new generation
is written beside the old one and fsynced, `manifest.json` is switched to it with one `os.replace`, then old
generations are removed. A new folder is written under a hidden sibling name (`.NAME.building-XXXXXXXX`) and
renamed into place when complete. A folder is written over only if it is ours (`claim`: it holds a manifest of
this format), never a file, a link, or another folder. A writer holds a lock on the folder it writes; what a
SIGKILL leaves (a stray generation, a temporary manifest, a staging folder) is recognised by its name and
contents and removed by the next write.

Knows: files, names, sizes, checksums, renames, locks, and the tokenizer fingerprint every manifest records.
Does not know: what the files contain, which files an owner needs (the owner names them), or what the manifest's
other fields mean.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import stat
import uuid
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: writers are not locked against each other
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "MANIFEST_FILE",
    "MAX_FILE_BYTES",
    "MAX_MANIFEST_BYTES",
    "FolderFormat",
    "FolderFormatError",
    "Generation",
    "GenerationGone",
    "check_file_entries",
    "claim",
    "data_dir",
    "file_entry",
    "is_count",
    "new_generation",
    "own_manifest",
    "read_manifest",
    "sha256_file",
    "tokenizer_fingerprint",
    "verify_files",
    "write_manifest",
]

MANIFEST_FILE = "manifest.json"
MAX_MANIFEST_BYTES = 1 << 20  # a manifest is a few KB; a bigger one is not ours
MAX_FILE_BYTES = 1 << 50  # a declared size above 1 PiB is nonsense, refused before anything else
_CHUNK = 1 << 20
_GENERATION = re.compile(r"gen-[0-9a-f]{16}")
_MANIFEST_TMP = re.compile(r"\.manifest\.json\.tmp-[0-9a-f]{16}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_STAGING = ".building-"


class FolderFormatError(ValueError):
    """A folder that cannot be used: missing, corrupt, truncated, another format or version, not ours."""


class GenerationGone(FolderFormatError):
    """A file of the manifest's generation vanished: a writer may have switched generations; re-read and retry."""


@dataclass(frozen=True)
class FolderFormat:
    """What a checked folder's owner declares about it.

    name: the manifest's "format" (e.g. "refdecode-corpus-index"); version: the version written; readable: the
    versions read (default: only `version`); flat_versions: readable versions whose files lie in the folder itself
    rather than in a generation; label: how messages name such a folder ("index", "output memory", "heads");
    data_files: every fixed file name a generation may hold; data_patterns: regular expressions (matched whole)
    for numbered names whose count varies (e.g. `part.NNNNN.npy`); together they are what a commit accepts
    and what cleanup may remove; renew: what to do about an unreadable version, ending that message (e.g.
    "rebuild it with `refdecode index build --force`").
    """

    name: str
    version: int
    label: str
    data_files: frozenset[str]
    readable: tuple[int, ...] = ()
    flat_versions: tuple[int, ...] = ()
    renew: str = ""
    data_patterns: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.readable:
            object.__setattr__(self, "readable", (self.version,))
        if self.version not in self.readable or self.version in self.flat_versions:
            raise ValueError(f"format {self.name}: the version written must be readable and use a generation")

    def holds(self, name: str) -> bool:
        """Whether a generation of this format may hold a file called `name`: a fixed name or a pattern's."""
        return name in self.data_files or any(re.fullmatch(p, name) for p in self.data_patterns)


def tokenizer_fingerprint(tokenizer) -> str:
    """A stable hash of the tokenizer's vocabulary (token -> id map) and its special tokens.

    Two tokenizers with the same fingerprint map every text to the same ids, as far as the vocabulary decides;
    ids saved with one are valid for the other. Every checked folder of token ids records it.
    """
    vocab = tokenizer.get_vocab()
    items = sorted((str(tok), int(i)) for tok, i in vocab.items())
    special = sorted(str(t) for t in (getattr(tokenizer, "all_special_tokens", None) or []))
    blob = json.dumps({"vocab": items, "special": special}, ensure_ascii=False, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(blob.encode("utf-8")).hexdigest()[:32]


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def file_entry(path: Path) -> dict:
    """Size and SHA-256 of one file, as the manifest records it."""
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}


# -- reading -----------------------------------------------------------------------------------------------------


def is_count(value, limit: int = MAX_FILE_BYTES) -> bool:
    """A JSON integer in [0, limit] (bool is not an integer here, nor is 1e3)."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= limit


def _is_plain_name(name) -> bool:
    """A file name with no directory part, not hidden, not '.' or '..', no NUL: it stays inside its folder."""
    return (
        isinstance(name, str)
        and 0 < len(name) <= 255
        and "/" not in name
        and "\\" not in name
        and "\x00" not in name
        and not name.startswith(".")
        and Path(name).name == name
    )


def check_file_entries(folder: Path, fmt: FolderFormat, files) -> None:
    """A manifest's `files`: a non-empty map of plain names to {"bytes": size, "sha256": 64 hex digits}."""
    if not isinstance(files, dict) or not files:
        raise FolderFormatError(f"{fmt.label} {folder}: {MANIFEST_FILE} lists no files")
    for name, entry in files.items():
        if not _is_plain_name(name):
            raise FolderFormatError(f"{fmt.label} {folder}: manifest names a file outside the {fmt.label}: {name!r}")
        if (
            not isinstance(entry, dict)
            or not is_count(entry.get("bytes"))
            or not (isinstance(entry.get("sha256"), str) and _SHA256.fullmatch(entry["sha256"]))
        ):
            raise FolderFormatError(
                f"{fmt.label} {folder}: manifest entry of {name} needs 'bytes' (an integer in "
                f"[0, 2**50]) and 'sha256' (64 hex digits)"
            )


def _load_json(path: Path, folder: Path, fmt: FolderFormat):
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_MANIFEST_BYTES + 1)
        if len(raw) > MAX_MANIFEST_BYTES:
            raise FolderFormatError(f"{fmt.label} {folder}: {MANIFEST_FILE} is larger than {MAX_MANIFEST_BYTES} bytes")
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise FolderFormatError(f"{fmt.label} {folder}: {MANIFEST_FILE} is corrupt ({e})") from None


def read_manifest(folder: Path, fmt: FolderFormat, *, files: bool = True) -> dict:
    """Parse and check `manifest.json`: this format, a readable version, a plain generation name (versions with a
    generation), and (with `files`) well-formed file entries (plain names, integer sizes, hex checksums). What the
    owner needs from the other fields is the owner's to check. `files=False` is for an older version that records
    its files in another field; its owner checks them."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FolderFormatError(f"no {fmt.label} at {folder}: not a folder")
    path = folder / MANIFEST_FILE
    if path.is_symlink() or not path.is_file():
        why = "an unfinished write?" if not any(folder.iterdir()) else f"it is not a refdecode {fmt.label}"
        raise FolderFormatError(f"no {fmt.label} at {folder}: {MANIFEST_FILE} is missing ({why})")
    manifest = _load_json(path, folder, fmt)
    if not isinstance(manifest, dict) or manifest.get("format") != fmt.name:
        raise FolderFormatError(f"{fmt.label} {folder}: {MANIFEST_FILE} is not a refdecode {fmt.label} manifest")
    version = manifest.get("version")
    if isinstance(version, bool) or version not in fmt.readable:
        renew = f"; {fmt.renew}" if fmt.renew else ""
        raise FolderFormatError(
            f"{fmt.label} {folder}: format version {version!r} is not supported by this refdecode "
            f"(reads versions {', '.join(map(str, fmt.readable))}){renew}"
        )
    if version not in fmt.flat_versions and not (
        isinstance(manifest.get("generation"), str) and _GENERATION.fullmatch(manifest["generation"])
    ):
        raise FolderFormatError(
            f"{fmt.label} {folder}: {MANIFEST_FILE} names no valid generation folder "
            f"(gen- and 16 hex digits): {manifest.get('generation')!r}"
        )
    if files:
        check_file_entries(folder, fmt, manifest.get("files"))
    return manifest


def data_dir(folder: Path, fmt: FolderFormat, manifest: dict) -> Path:
    """The folder holding the manifest's data files: its generation subfolder, or the folder itself (a flat
    version)."""
    folder = Path(folder)
    if manifest["version"] in fmt.flat_versions:
        return folder
    gen = folder / manifest["generation"]
    try:
        mode = os.lstat(gen).st_mode
    except FileNotFoundError:
        raise GenerationGone(f"{fmt.label} {folder}: generation {manifest['generation']} is missing") from None
    if not stat.S_ISDIR(mode):
        raise FolderFormatError(f"{fmt.label} {folder}: {manifest['generation']} is not a plain folder (a symlink?)")
    return gen


def verify_files(
    folder: Path, fmt: FolderFormat, manifest: dict, required: Collection[str], *, checksums: bool = True
) -> Path:
    """Check that the manifest lists exactly the files `required` (the code decides which, not the manifest),
    and that each is a plain file (not a symlink) of the recorded size and (by default) SHA-256.
    -> the folder holding them. Sizes and names are always checked; `checksums=False` skips only the hashing."""
    folder = Path(folder)
    listed = set(manifest["files"])
    if listed != set(required):
        missing, extra = sorted(set(required) - listed), sorted(listed - set(required))
        raise FolderFormatError(
            f"{fmt.label} {folder}: {MANIFEST_FILE} does not list the files this {fmt.label} needs "
            f"(unlisted: {', '.join(missing) or '-'}; unexpected: {', '.join(extra) or '-'})"
        )
    where = data_dir(folder, fmt, manifest)
    if where != folder:  # only a writer puts files into a generation: one the manifest does not list was added
        try:
            added = sorted(p.name for p in where.iterdir() if p.name not in listed)
        except FileNotFoundError:
            raise GenerationGone(f"{fmt.label} {folder}: generation {manifest['generation']} is missing") from None
        if added:
            raise FolderFormatError(
                f"{fmt.label} {folder}: generation {manifest['generation']} holds {added[0]}, which the manifest "
                f"does not list (a modified folder?)"
            )
    for name in sorted(required):
        entry = manifest["files"][name]
        try:
            st = os.lstat(where / name)
        except FileNotFoundError:
            raise GenerationGone(f"{fmt.label} {folder}: file {name} is missing") from None
        if not stat.S_ISREG(st.st_mode):
            raise FolderFormatError(f"{fmt.label} {folder}: file {name} is not a plain file (a symlink or a folder)")
        if st.st_size != entry["bytes"]:
            raise FolderFormatError(
                f"{fmt.label} {folder}: file {name} has {st.st_size} bytes, the manifest says "
                f"{entry['bytes']} (truncated or replaced)"
            )
    if checksums:
        for name in sorted(required):
            try:
                digest = sha256_file(where / name)
            except FileNotFoundError:
                raise GenerationGone(f"{fmt.label} {folder}: file {name} is missing") from None
            if digest != manifest["files"][name]["sha256"]:
                raise FolderFormatError(f"{fmt.label} {folder}: file {name} fails its checksum (corrupted or modified)")
    return where


# -- ownership ---------------------------------------------------------------------------------------------------


def own_manifest(folder: Path, fmt: FolderFormat) -> dict | None:
    """The JSON of `folder`'s manifest if it is a manifest of `fmt` of any version (one of a newer or older
    refdecode is still ours to replace), else None: no manifest, a link, too big, not JSON, another format."""
    path = Path(folder) / MANIFEST_FILE
    try:
        if path.is_symlink() or not path.is_file() or path.stat().st_size > MAX_MANIFEST_BYTES:
            return None
        manifest = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("format") == fmt.name else None


def claim(
    out: Path,
    fmt: FolderFormat,
    *,
    advice: str = "it is never written over: remove it yourself or choose another folder",
    unmarked: bool = False,
    through_link: bool = False,
) -> bool:
    """Refuse to write `out` unless it is absent or ours: a folder holding a manifest of `fmt` (any version).
    unmarked: a folder with no manifest at all may be written into too (its other files are left alone);
    through_link: a link to such a folder counts as the folder. `advice` ends the refusal.
    -> whether `out` exists (a folder to write a new generation into)."""
    out = Path(out)
    if not os.path.lexists(out):
        return False
    if (out.is_symlink() and not through_link) or not out.is_dir():
        raise FolderFormatError(
            f"{out} is not a refdecode {fmt.label}: it is a file or a link, not a folder holding a refdecode "
            f"{fmt.label}; {advice}"
        )
    if own_manifest(out, fmt) is None and not (unmarked and not os.path.lexists(out / MANIFEST_FILE)):
        raise FolderFormatError(
            f"{out} does not hold a refdecode {fmt.label} ({MANIFEST_FILE} is missing or is not a refdecode "
            f"{fmt.label} manifest); {advice}"
        )
    return True


# -- writing -----------------------------------------------------------------------------------------------------


def write_manifest(root: Path, manifest: dict) -> None:
    """Make `manifest` root's manifest.json atomically: written and fsynced under a hidden temporary name, switched
    in with one os.replace (a reader sees the old manifest or the new one, never a part), then the folder fsynced.
    The temporary file never outlives a failure."""
    tmp = root / f".{MANIFEST_FILE}.tmp-{uuid.uuid4().hex[:16]}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, root / MANIFEST_FILE)
    except BaseException:
        _unlink(tmp)
        raise
    _fsync(root)


class Generation:
    """One generation being written: data files go into `dir`; `commit` records them and switches the manifest."""

    def __init__(self, root: Path, fmt: FolderFormat):
        self.root, self.fmt = root, fmt
        self.name = f"gen-{uuid.uuid4().hex[:16]}"
        self.dir = root / self.name
        self.committed = False

    def commit(self, manifest: dict, files: Collection[str]) -> dict:
        """Record `files` (names inside `dir`) with sizes and checksums, plus format, version and generation, and
        make this generation the folder's: one atomic `os.replace` of `manifest.json`. -> the full manifest"""
        unknown = sorted(name for name in set(files) if not self.fmt.holds(name))
        if unknown:
            raise ValueError(f"format {self.fmt.name} holds no file named {', '.join(unknown)}")
        for name in files:
            _fsync(self.dir / name)
        _fsync(self.dir)
        full = {
            "format": self.fmt.name,
            "version": self.fmt.version,
            "generation": self.name,
            **manifest,
            "files": {name: file_entry(self.dir / name) for name in files},
        }
        write_manifest(self.root, full)
        self.committed = True
        return full


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:  # some file systems refuse fsync on a folder; the rename order still holds
        if e.errno not in (errno.EINVAL, errno.EBADF):
            raise
    finally:
        os.close(fd)


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


@contextlib.contextmanager
def _locked(folder: Path, out: Path) -> Iterator[None]:
    """An exclusive lock on `folder` itself (no lock file to leave behind) while it is written; the kernel drops it
    when the process dies, however it dies."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise FolderFormatError(
                    f"another refdecode process is writing {out} right now; try again when it ends"
                ) from None
        yield
    finally:
        os.close(fd)  # closing the only descriptor releases the lock


def _is_ours(folder: Path, fmt: FolderFormat) -> bool:
    """A generation folder as a writer writes it: plain files with the names the format uses, nothing else."""
    try:
        return all(fmt.holds(p.name) and stat.S_ISREG(os.lstat(p).st_mode) for p in folder.iterdir())
    except OSError:
        return False


def _remove_leftovers(root: Path, manifest: dict, fmt: FolderFormat) -> None:
    """Remove what earlier writes of `root` left: generations the manifest does not name (only those holding
    nothing but the format's files) and temporary manifests."""
    current = manifest.get("generation") or ""
    for entry in root.iterdir():
        if entry.is_symlink():
            continue
        if _GENERATION.fullmatch(entry.name) and entry.name != current and entry.is_dir():
            if _is_ours(entry, fmt):
                shutil.rmtree(entry, ignore_errors=True)
        elif _MANIFEST_TMP.fullmatch(entry.name):
            _unlink(entry)


def _remove_flat_files(root: Path, fmt: FolderFormat) -> None:
    """After a flat version is replaced: its data files, the ones the format knows by name and nothing else."""
    for name in sorted(fmt.data_files):
        path = root / name
        if path.is_file() and not path.is_symlink():
            _unlink(path)


def _remove_stale_staging(out: Path, fmt: FolderFormat) -> None:
    """Staging folders of killed writes of `out` (`.NAME.building-XXXXXXXX`) that hold only what a write makes
    and that no running writer holds locked."""
    pattern = re.compile(re.escape(f".{out.name}{_STAGING}") + r"[0-9a-f]{8}")
    for entry in out.parent.iterdir():
        if not pattern.fullmatch(entry.name) or entry.is_symlink() or not entry.is_dir():
            continue
        if not all(
            p.name == MANIFEST_FILE
            or _MANIFEST_TMP.fullmatch(p.name)
            or (_GENERATION.fullmatch(p.name) and p.is_dir() and _is_ours(p, fmt))
            for p in entry.iterdir()
        ):
            continue
        try:
            with _locked(entry, out):
                shutil.rmtree(entry, ignore_errors=True)
        except FolderFormatError:
            continue  # a live writer holds it


@contextlib.contextmanager
def new_generation(out: Path, fmt: FolderFormat, *, replacing: bool) -> Iterator[Generation]:
    """Yield a fresh generation to write into; it becomes `out`'s when the caller commits it.

    replacing (what `claim` answered): the generation is written inside `out` and committed by switching
    `out/manifest.json`, so `out` is readable at every instant; old generations (and an old flat version's files)
    are removed after the switch. Otherwise the whole folder is written in a hidden sibling folder, then renamed
    to `out`. On any error (or without a commit) everything this write made is removed and `out` is as before.
    """
    out = Path(out)
    if not replacing:
        out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(out, fmt)
    root = out if replacing else out.parent / f".{out.name}{_STAGING}{uuid.uuid4().hex[:8]}"
    if not replacing:
        root.mkdir()
    try:
        with _locked(root, out):
            # 1) what killed writes left goes first (never the generation the manifest names)
            old = (own_manifest(root, fmt) or {}) if replacing else {}
            if replacing:
                _remove_leftovers(root, old, fmt)
            # 2) the caller writes and commits: the manifest switches to the new generation in one os.replace
            gen = Generation(root, fmt)
            gen.dir.mkdir()
            try:
                yield gen
                if not gen.committed:
                    raise RuntimeError(f"the write of {out} ended without committing its manifest")
                if not replacing:
                    if os.path.lexists(out):
                        raise FolderFormatError(f"{out} appeared while it was being written; it is not replaced")
                    os.rename(root, out)
            except BaseException:
                # the generation goes unless the manifest names it (a failure after the switch, e.g. in its fsync)
                if replacing and (own_manifest(root, fmt) or {}).get("generation") != gen.name:
                    shutil.rmtree(gen.dir, ignore_errors=True)
                raise
            if replacing:
                # 3) the old generation goes only after the switch; readers that held it re-read the manifest
                _remove_leftovers(root, {"generation": gen.name}, fmt)
                if old.get("version") in fmt.flat_versions:
                    _remove_flat_files(root, fmt)
    except BaseException:
        if not replacing:
            shutil.rmtree(root, ignore_errors=True)
        raise
