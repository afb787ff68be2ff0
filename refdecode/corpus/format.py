"""On-disk format of a corpus index: manifest, checksums, versions, generations and their atomic replacement.

An index is a folder `indexes/NAME/` holding one `manifest.json` and one generation subfolder `gen-<16 hex>/` with
the data files (numpy `.npy` arrays, JSON, faiss's own index file, a UTF-8 text blob). The manifest names the
format and version, the generation, the tokenizer fingerprint, the model name, the counts, the build options,
and every data file with its size and SHA-256. Loading checks the manifest's structure first and every file
against it before anything opens that file, so a truncated or tampered file is refused with a message (faiss
would otherwise crash or read garbage). Nothing here unpickles or follows a symlink. Version 1 indexes (the same
files flat in the folder, no generation) still load.

Replacing an index (`force=True`) never leaves `out` without a loadable index: the new generation is written
beside the old one inside `out`, then `manifest.json` is switched to it with one `os.replace`, then the old
generation is removed. A reader that read the old manifest and finds its files gone re-reads the manifest and
retries (see `GenerationGone`). A new index is built in a hidden sibling folder and renamed into place when
complete. `force` only ever replaces a folder that holds a refdecode index manifest, never a file, another folder,
or a folder that contains or lies inside a source. Nothing of a build stays behind; what a SIGKILL leaves (a
stray generation, a temporary manifest, a staging folder) is recognised by its name and contents and removed by
the next build.

Knows: files, names, sizes, checksums, renames, locks. Does not know: what the files contain (spans, passages,
embeddings) or which files an index needs: callers name them.
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
from collections.abc import Collection, Iterator, Sequence
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: builds are not locked against each other
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MANIFEST_FILE",
    "READABLE_VERSIONS",
    "Generation",
    "GenerationGone",
    "IndexFormatError",
    "check_target",
    "check_tokenizer",
    "data_dir",
    "file_entry",
    "new_generation",
    "own_manifest",
    "read_manifest",
    "tokenizer_fingerprint",
    "verify_files",
    "write_manifest",
]

FORMAT_NAME = "refdecode-corpus-index"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
MANIFEST_FILE = "manifest.json"
MAX_MANIFEST_BYTES = 1 << 20  # a manifest is a few KB; a bigger one is not ours
MAX_FILE_BYTES = 1 << 50  # a declared size above 1 PiB is nonsense, refused before anything else
_CHUNK = 1 << 20
_GENERATION = re.compile(r"gen-[0-9a-f]{16}")
_MANIFEST_TMP = re.compile(r"\.manifest\.json\.tmp-[0-9a-f]{16}")
_SHA256 = re.compile(r"[0-9a-f]{64}")


class IndexFormatError(ValueError):
    """An index folder that cannot be used: missing, corrupt, truncated, another version or another tokenizer."""


class GenerationGone(IndexFormatError):
    """A file of the manifest's generation vanished: a rebuild may have switched generations; re-read and retry."""


def tokenizer_fingerprint(tokenizer) -> str:
    """A stable hash of the tokenizer's vocabulary (token -> id map) and its special tokens.

    Two tokenizers with the same fingerprint map every text to the same ids, as far as the vocabulary decides;
    ids in an index built with one are valid for the other.
    """
    vocab = tokenizer.get_vocab()
    items = sorted((str(tok), int(i)) for tok, i in vocab.items())
    special = sorted(str(t) for t in (getattr(tokenizer, "all_special_tokens", None) or []))
    blob = json.dumps({"vocab": items, "special": special}, ensure_ascii=False, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(blob.encode("utf-8")).hexdigest()[:32]


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks (checked folders: indexes, output memories, heads)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def file_entry(path: Path) -> dict:
    """Size and SHA-256 of one file, as the manifest records it."""
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}


# -- reading ---------------------------------------------------------------------------------------------------


def _is_count(value, limit: int = MAX_FILE_BYTES) -> bool:
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


def _check_file_entries(folder: Path, files) -> None:
    if not isinstance(files, dict) or not files:
        raise IndexFormatError(f"index {folder}: {MANIFEST_FILE} lists no files")
    for name, entry in files.items():
        if not _is_plain_name(name):
            raise IndexFormatError(f"index {folder}: manifest names a file outside the index: {name!r}")
        if (
            not isinstance(entry, dict)
            or not _is_count(entry.get("bytes"))
            or not (isinstance(entry.get("sha256"), str) and _SHA256.fullmatch(entry["sha256"]))
        ):
            raise IndexFormatError(
                f"index {folder}: manifest entry of {name} needs 'bytes' (an integer in "
                f"[0, 2**50]) and 'sha256' (64 hex digits)"
            )


def read_manifest(folder: Path) -> dict:
    """Parse and check `manifest.json`: this format, a readable version, a plain generation name (version 2),
    and well-formed file entries (plain names, integer sizes, hex checksums). What the index needs from the
    other fields is the caller's to check."""
    folder = Path(folder)
    if not folder.is_dir():
        raise IndexFormatError(f"no index at {folder}: not a folder")
    path = folder / MANIFEST_FILE
    if path.is_symlink() or not path.is_file():
        raise IndexFormatError(f"no index at {folder}: {MANIFEST_FILE} is missing (an unfinished build?)")
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_MANIFEST_BYTES + 1)
        if len(raw) > MAX_MANIFEST_BYTES:
            raise IndexFormatError(f"index {folder}: {MANIFEST_FILE} is larger than {MAX_MANIFEST_BYTES} bytes")
        manifest = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise IndexFormatError(f"index {folder}: {MANIFEST_FILE} is corrupt ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise IndexFormatError(f"index {folder}: {MANIFEST_FILE} is not a refdecode corpus index manifest")
    version = manifest.get("version")
    if isinstance(version, bool) or version not in READABLE_VERSIONS:
        raise IndexFormatError(
            f"index {folder}: format version {version!r} is not supported by this refdecode "
            f"(reads versions {', '.join(map(str, READABLE_VERSIONS))}); rebuild it with "
            f"`refdecode index build --force`"
        )
    if version >= 2 and not (
        isinstance(manifest.get("generation"), str) and _GENERATION.fullmatch(manifest["generation"])
    ):
        raise IndexFormatError(
            f"index {folder}: {MANIFEST_FILE} names no valid generation folder "
            f"(gen- and 16 hex digits): {manifest.get('generation')!r}"
        )
    _check_file_entries(folder, manifest.get("files"))
    return manifest


def data_dir(folder: Path, manifest: dict) -> Path:
    """The folder holding the manifest's data files: its generation subfolder (version 2) or the index itself."""
    folder = Path(folder)
    if manifest["version"] < 2:
        return folder
    gen = folder / manifest["generation"]
    try:
        mode = os.lstat(gen).st_mode
    except FileNotFoundError:
        raise GenerationGone(f"index {folder}: generation {manifest['generation']} is missing") from None
    if not stat.S_ISDIR(mode):
        raise IndexFormatError(f"index {folder}: {manifest['generation']} is not a plain folder (a symlink?)")
    return gen


def verify_files(folder: Path, manifest: dict, required: Collection[str], *, checksums: bool = True) -> Path:
    """Check that the manifest lists exactly the files `required` (the code decides which, not the manifest),
    and that each is a plain file (not a symlink) of the recorded size and (by default) SHA-256.
    -> the folder holding them. Sizes and names are always checked; `checksums=False` skips only the hashing."""
    folder = Path(folder)
    listed = set(manifest["files"])
    if listed != set(required):
        missing, extra = sorted(set(required) - listed), sorted(listed - set(required))
        raise IndexFormatError(
            f"index {folder}: {MANIFEST_FILE} does not list the files this index needs "
            f"(unlisted: {', '.join(missing) or '-'}; unexpected: {', '.join(extra) or '-'})"
        )
    where = data_dir(folder, manifest)
    for name in sorted(required):
        entry = manifest["files"][name]
        try:
            st = os.lstat(where / name)
        except FileNotFoundError:
            raise GenerationGone(f"index {folder}: file {name} is missing") from None
        if not stat.S_ISREG(st.st_mode):
            raise IndexFormatError(f"index {folder}: file {name} is not a plain file (a symlink or a folder)")
        if st.st_size != entry["bytes"]:
            raise IndexFormatError(
                f"index {folder}: file {name} has {st.st_size} bytes, the manifest says "
                f"{entry['bytes']} (truncated or replaced)"
            )
    if checksums:
        for name in sorted(required):
            try:
                digest = sha256_file(where / name)
            except FileNotFoundError:
                raise GenerationGone(f"index {folder}: file {name} is missing") from None
            if digest != manifest["files"][name]["sha256"]:
                raise IndexFormatError(f"index {folder}: file {name} fails its checksum (corrupted or modified)")
    return where


def check_tokenizer(folder: Path, manifest: dict, tokenizer) -> None:
    """Refuse an index whose token ids come from another tokenizer than `tokenizer`."""
    have = tokenizer_fingerprint(tokenizer)
    if manifest.get("tokenizer_fingerprint") != have:
        raise IndexFormatError(
            f"index {folder} was built for another tokenizer (model {manifest.get('model_name')!r}, fingerprint "
            f"{manifest.get('tokenizer_fingerprint')}); this tokenizer's fingerprint is {have}. "
            f"Rebuild the index with this model's tokenizer"
        )


# -- writing ---------------------------------------------------------------------------------------------------


def _overlaps(a: Path, b: Path) -> bool:
    return a == b or a in b.parents or b in a.parents


def check_target(out: Path, *, force: bool, protect: Sequence[str | Path] = ()) -> bool:
    """Refuse an output that may not be written: one that is, contains or lies inside a path of `protect` (the
    sources), an existing path without `force`, and with `force` anything but a folder holding an index
    manifest. -> whether `out` exists (an index to replace)."""
    out = Path(out)
    where = out.resolve()
    for src in protect:
        if _overlaps(where, Path(src).resolve()):
            raise IndexFormatError(
                f"--out {out} overlaps the source {src}: an index is never written into, over "
                f"or around its own sources; choose another --out"
            )
    if not os.path.lexists(out):
        return False
    if not force:
        raise IndexFormatError(f"{out} already exists; pass --force (force=True) to replace it")
    if not out.is_dir():
        raise IndexFormatError(
            f"{out} is not a folder holding a refdecode index; --force only replaces an index, "
            f"never anything else: remove it yourself or choose another --out"
        )
    if own_manifest(out) is None:
        raise IndexFormatError(
            f"{out} does not hold a refdecode index (no {MANIFEST_FILE} of this format); "
            f"--force only replaces an index, never anything else: remove it yourself or "
            f"choose another --out"
        )
    return True


def own_manifest(folder: Path, format_name: str = FORMAT_NAME) -> dict | None:
    """The JSON of `folder`'s manifest if it is a manifest of format `format_name` (a corpus index by default, an
    output memory for refdecode.memory) of any version (one of a newer or older refdecode is still ours to
    replace), else None: no manifest, a link, too big, not JSON, another format."""
    path = folder / MANIFEST_FILE
    try:
        if path.is_symlink() or not path.is_file() or path.stat().st_size > MAX_MANIFEST_BYTES:
            return None
        manifest = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("format") == format_name else None


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

    def __init__(self, root: Path):
        self.root = root
        self.name = f"gen-{uuid.uuid4().hex[:16]}"
        self.dir = root / self.name
        self.committed = False

    def commit(self, manifest: dict, files: list[str]) -> dict:
        """Record `files` (names inside `dir`) with sizes and checksums, plus format, version and generation, and
        make this generation the index's: one atomic `os.replace` of `manifest.json`. -> the full manifest"""
        for name in files:
            _fsync(self.dir / name)
        _fsync(self.dir)
        full = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
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
    """An exclusive lock on `folder` itself (no lock file to leave behind) for the build; the kernel drops it
    when the process dies, however it dies."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise IndexFormatError(f"another build is writing {out} right now; try again when it ends") from None
        yield
    finally:
        os.close(fd)  # closing the only descriptor releases the lock


def _is_ours(folder: Path, data_files: Collection[str]) -> bool:
    """A generation folder as a build writes it: plain files with the names an index uses, nothing else."""
    try:
        return all(p.name in data_files and p.is_file() and not p.is_symlink() for p in folder.iterdir())
    except OSError:
        return False


def _remove_generation(folder: Path, data_files: Collection[str]) -> None:
    if _is_ours(folder, data_files):
        shutil.rmtree(folder, ignore_errors=True)


def _remove_leftovers(root: Path, manifest: dict, data_files: Collection[str], keep: str = "") -> None:
    """Remove what earlier builds of `root` left: generations the manifest does not name (only those holding
    nothing but index files) and temporary manifests."""
    current = manifest.get("generation") or ""
    for entry in root.iterdir():
        if (
            _GENERATION.fullmatch(entry.name)
            and entry.name not in (current, keep)
            and not entry.is_symlink()
            and entry.is_dir()
        ):
            _remove_generation(entry, data_files)
        elif _MANIFEST_TMP.fullmatch(entry.name) and not entry.is_symlink():
            _unlink(entry)


def _remove_flat_files(root: Path, old: dict, data_files: Collection[str]) -> None:
    """After a version 1 index is replaced: its data files, the ones the code knows by name and nothing else."""
    files = old.get("files")
    for name in files if isinstance(files, dict) else ():
        path = root / name
        if name in data_files and path.is_file() and not path.is_symlink():
            _unlink(path)


def _remove_stale_staging(out: Path, data_files: Collection[str]) -> None:
    """Staging folders of killed builds of `out` (`.NAME.building-XXXXXXXX`) that hold only what a build writes
    and that no running build holds locked."""
    pattern = re.compile(re.escape(f".{out.name}.building-") + r"[0-9a-f]{8}")
    for entry in out.parent.iterdir():
        if not pattern.fullmatch(entry.name) or entry.is_symlink() or not entry.is_dir():
            continue
        names = [p for p in entry.iterdir()]
        if not all(
            p.name == MANIFEST_FILE
            or _MANIFEST_TMP.fullmatch(p.name)
            or (_GENERATION.fullmatch(p.name) and p.is_dir() and _is_ours(p, data_files))
            for p in names
        ):
            continue
        try:
            with _locked(entry, out):
                shutil.rmtree(entry, ignore_errors=True)
        except IndexFormatError:
            continue  # a live build holds it


@contextlib.contextmanager
def new_generation(
    out: Path, *, force: bool, data_files: Collection[str], protect: Sequence[str | Path] = ()
) -> Iterator[Generation]:
    """Yield a fresh generation to write an index into; it becomes `out`'s index when the caller commits it.

    With an existing index at `out` (only with `force`): the generation is written inside `out` and committed by
    switching `out/manifest.json`, so `out` is a loadable index at every instant; old generations are removed
    after the switch. Without one: the whole index is built in a hidden sibling folder, then renamed to `out`.
    On any error (or without a commit) everything this build wrote is removed and `out` is as before.
    `data_files`: every file name an index may hold (what cleanup may remove); `protect`: the sources.
    """
    out = Path(out)
    replacing = check_target(out, force=force, protect=protect)
    if not replacing:
        out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(out, data_files)
    root = out if replacing else out.parent / f".{out.name}.building-{uuid.uuid4().hex[:8]}"
    if not replacing:
        root.mkdir()
    try:
        with _locked(root, out):
            old = (own_manifest(root) or {}) if replacing else {}
            if replacing:
                _remove_leftovers(root, old, data_files)
            gen = Generation(root)
            gen.dir.mkdir()
            try:
                yield gen
                if not gen.committed:
                    raise RuntimeError("the index build ended without committing its manifest")
                if not replacing:
                    if os.path.lexists(out):
                        raise IndexFormatError(f"{out} appeared during the build; pass --force to replace it")
                    os.rename(root, out)
            except BaseException:
                if replacing and not gen.committed:
                    shutil.rmtree(gen.dir, ignore_errors=True)
                raise
            if replacing:
                # 3) the old generation goes only after the switch; readers that held it re-read the manifest
                _remove_leftovers(root, read_manifest(root), data_files, keep=gen.name)
                if old.get("version") == 1:
                    _remove_flat_files(root, old, data_files)
    except BaseException:
        if not replacing:
            shutil.rmtree(root, ignore_errors=True)
        raise
