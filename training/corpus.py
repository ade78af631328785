"""Build a multi-domain text corpus from software installed on this machine (Python stdlib, Debian packages).

Four domains of clearly different text (Python source, Python reST docs, the KJV Bible, the GCIDE dictionary) let
small MoE models trained on the corpus specialise their experts by domain. Each domain is capped in bytes, split by
document into train/validation/test, and written as `DIR/<domain>/<split>.jsonl` plus `DIR/manifest.json`. The
output is byte-identical across runs on the same machine.

Not for: tokenising (see training.tokenizer), downloading data from the internet beyond Debian packages, or
building corpora large enough for anything but small experimental models.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import platform
import re
import subprocess
import sys
import sysconfig
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from html.parser import HTMLParser
from pathlib import Path

SPLITS = ("train", "validation", "test")
DOMAINS = ("python_src", "python_doc", "bible", "dictionary")
Log = Callable[[str], None]


@dataclass(frozen=True)
class CorpusConfig:
    max_bytes_per_domain: int = 8_000_000
    install: bool = True
    domains: tuple[str, ...] = DOMAINS
    seed: int = 0
    validation_fraction: float = 0.05
    test_fraction: float = 0.05
    dictionary_entries_per_document: int = 100


@dataclass(frozen=True)
class Document:
    id: str
    text: str


@dataclass(frozen=True)
class _Domain:
    # Debian packages the reader needs; the first is the one credited as the text's source in the manifest.
    packages: tuple[str, ...]
    read: Callable[[CorpusConfig], list[Document]]
    # Where the text really lives when the credited package is only a pointer to it (python3-doc -> python3.X-doc).
    content: Callable[[], Path] | None = None


def _stderr(message: str) -> None:
    print(f"training.corpus: {message}", file=sys.stderr)


def _run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive", "LC_ALL": "C"}
    return subprocess.run(cmd, check=False, capture_output=True, text=True, stdin=subprocess.DEVNULL, env=env)


def _dpkg_version(package: str) -> str | None:
    try:
        r = _run(["dpkg-query", "-W", "-f=${Status}\t${Version}", package])
    except FileNotFoundError:
        return None
    status, _, version = r.stdout.partition("\t")
    return version if r.returncode == 0 and status.endswith(" installed") else None


def _dpkg_files(package: str) -> list[Path]:
    r = _run(["dpkg-query", "-L", package])
    if r.returncode != 0:
        raise RuntimeError(f"dpkg-query -L {package} failed: {r.stderr.strip()}")
    return [Path(line) for line in r.stdout.splitlines() if line.strip()]


def _owner(path: Path) -> str | None:
    r = _run(["dpkg-query", "-S", str(path)])
    return r.stdout.split(":", 1)[0].strip() if r.returncode == 0 else None


def _install(packages: list[str], log: Log) -> None:
    cmd = ["apt-get", "install", "-y", "--no-install-recommends", *packages]
    log(f"installing {' '.join(packages)}")
    try:
        r = _run(cmd)
        if r.returncode != 0:
            # Stale package lists are the usual cause; an update is slow, so only pay for it on failure.
            log("apt-get install failed; running apt-get update and retrying")
            _run(["apt-get", "update"])
            r = _run(cmd)
    except FileNotFoundError as e:
        raise RuntimeError(f"cannot install {packages}: {e}; pass --no-install to skip those domains") from e
    if r.returncode != 0:
        raise RuntimeError(f"apt-get install {' '.join(packages)} failed:\n{r.stderr.strip()[-2000:]}")


def _normalise(text: str) -> str:
    return text.replace("\r\n", "\n")


# --- python_src ---------------------------------------------------------------------------------------------------

# test suites and IDLE would dominate the sample with boilerplate; pydoc_data/topics.py is the reST docs pasted into
# a dict, which would leak python_doc text (including its test split) into python_src.
_SKIP_DIRS = frozenset({"site-packages", "test", "tests", "idlelib", "pydoc_data", "__pycache__"})


def _read_python_src(config: CorpusConfig) -> list[Document]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for root, dirs, files in os.walk(stdlib):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS)
        for name in sorted(f for f in files if f.endswith(".py")):
            path = Path(root, name)
            try:
                text = path.read_bytes().decode("utf-8")
            except UnicodeDecodeError:
                continue
            # gencodec's charmap tables are ~1.4 MB of near-identical generated lines, not source anyone wrote.
            if "gencodec.py" in text[:400]:
                continue
            docs.append(Document(path.relative_to(stdlib).as_posix(), _normalise(text)))
    return docs


# --- python_doc ---------------------------------------------------------------------------------------------------


class _TextOfHtml(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in ("script", "style"):
            self._skip += 1

    def handle_endtag(self, tag: str) -> None:
        if tag in ("script", "style") and self._skip:
            self._skip -= 1

    def handle_data(self, data: str) -> None:
        if not self._skip:
            self.parts.append(data)


def _html_text(html: str) -> str:
    parser = _TextOfHtml()
    parser.feed(html)
    return re.sub(r"\n\s*\n+", "\n\n", "".join(parser.parts)).strip() + "\n"


def _python_doc_root() -> Path:
    html = [p for p in _dpkg_files("python3-doc") if p.name == "html" and p.resolve().is_dir()]
    if not html:
        raise RuntimeError("python3-doc ships no html directory; cannot find the Python documentation")
    return html[0].resolve()


def _read_python_doc(config: CorpusConfig) -> list[Document]:
    root = _python_doc_root()
    sources = root / "_sources"
    if any(sources.rglob("*.rst.txt")):
        # The reST sources are the cleanest text the package ships: no navigation chrome, markup kept readable.
        return [
            Document(p.relative_to(sources).as_posix().removesuffix(".txt"), _normalise(p.read_text("utf-8")))
            for p in sorted(sources.rglob("*.rst.txt"))
        ]
    pages = sorted(p for p in root.rglob("*.html") if not p.relative_to(root).parts[0].startswith("_"))
    return [Document(p.relative_to(root).as_posix(), _html_text(p.read_text("utf-8"))) for p in pages]


# --- bible --------------------------------------------------------------------------------------------------------

_KJV_BOOKS = (
    "Genesis Exodus Leviticus Numbers Deuteronomy Joshua Judges Ruth 1_Samuel 2_Samuel 1_Kings 2_Kings 1_Chronicles "
    "2_Chronicles Ezra Nehemiah Esther Job Psalms Proverbs Ecclesiastes Song_of_Solomon Isaiah Jeremiah Lamentations "
    "Ezekiel Daniel Hosea Joel Amos Obadiah Jonah Micah Nahum Habakkuk Zephaniah Haggai Zechariah Malachi Matthew Mark "
    "Luke John Acts Romans 1_Corinthians 2_Corinthians Galatians Ephesians Philippians Colossians 1_Thessalonians "
    "2_Thessalonians 1_Timothy 2_Timothy Titus Philemon Hebrews James 1_Peter 2_Peter 1_John 2_John 3_John Jude "
    "Revelation"
)
_VERSE = re.compile(r"^(\d?[A-Za-z]+)(\d+):(\d+) (.*)$")


def _read_bible(config: CorpusConfig) -> list[Document]:
    # bible.data is a private compressed format; the package's own reader is the only dependable decoder.
    data = [p for p in _dpkg_files("bible-kjv-text") if p.name == "bible.data"]
    if not data:
        raise RuntimeError("bible-kjv-text ships no bible.data")
    r = _run(["bible", "-f", "-p", str(data[0].parent), "Gen1:1-Rev22:21"])
    if r.returncode != 0:
        raise RuntimeError(f"bible failed: {r.stderr.strip()}")
    books = [b.replace("_", " ") for b in _KJV_BOOKS.split()]
    abbrevs: list[str] = []
    chapters: dict[tuple[int, int], list[str]] = {}
    for line in r.stdout.splitlines():
        m = _VERSE.match(line)
        if not m:
            raise RuntimeError(f"unexpected line from bible: {line[:80]!r}")
        if not abbrevs or abbrevs[-1] != m.group(1):
            abbrevs.append(m.group(1))
        book = len(abbrevs) - 1
        chapters.setdefault((book, int(m.group(2))), []).append(
            f"{books[book]} {m.group(2)}:{m.group(3)} {m.group(4).strip()}"
        )
    # The dump abbreviates book names; its canonical order is what maps them to full names.
    if len(abbrevs) != len(books):
        raise RuntimeError(f"bible printed {len(abbrevs)} books, expected {len(books)}")
    # 66 books would leave ~3 per held-out split; chapters give held-out sets that are not a handful of books.
    return [Document(f"{books[b]} {c}", "\n".join(verses) + "\n") for (b, c), verses in chapters.items()]


# --- dictionary ---------------------------------------------------------------------------------------------------

_B64 = {c: i for i, c in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")}


def _dictd_number(text: str) -> int:
    value = 0
    for c in text:
        value = value * 64 + _B64[c]
    return value


def _decode_entry(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        # A few GCIDE entries carry stray Windows-1252 punctuation (0x92 for an apostrophe).
        return raw.decode("cp1252", errors="replace")


def _read_dictionary(config: CorpusConfig) -> list[Document]:
    files = _dpkg_files("dict-gcide")
    dict_dz = next(p for p in files if p.name.endswith(".dict.dz"))
    index = next(p for p in files if p.name.endswith(".index"))
    data = gzip.decompress(dict_dz.read_bytes())  # dictzip is gzip with an extra header field
    spans: dict[tuple[int, int], bool] = {}
    for line in index.read_text("utf-8").splitlines():
        head, offset, length = line.split("\t")
        span = (_dictd_number(offset), _dictd_number(length))
        # Several headwords share one entry; 00-* headwords are the database's metadata and licence header.
        spans[span] = spans.get(span, False) or head.startswith("00-")
    entries = [_decode_entry(data[o : o + n]).strip("\n") for (o, n), meta in sorted(spans.items()) if not meta]
    size = config.dictionary_entries_per_document
    return [
        Document(f"gcide {i // size:05d}", _normalise("\n\n".join(entries[i : i + size])) + "\n")
        for i in range(0, len(entries), size)
    ]


_SOURCES = {
    "python_src": _Domain((), _read_python_src),
    "python_doc": _Domain(("python3-doc",), _read_python_doc, _python_doc_root),
    "bible": _Domain(("bible-kjv-text", "bible-kjv"), _read_bible),
    "dictionary": _Domain(("dict-gcide",), _read_dictionary),
}


# --- sampling, splitting, writing ---------------------------------------------------------------------------------


def _unit(key: str) -> float:
    """A stable uniform number in [0, 1) for `key` (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.sha1(key.encode("utf-8")).digest()[:8], "big") / 2**64


def sample(docs: list[Document], config: CorpusConfig) -> list[Document]:
    """Documents in a seeded pseudo-random order, greedily kept while they fit the domain's byte cap."""
    order = sorted(docs, key=lambda d: (_unit(f"order:{config.seed}:{d.id}"), d.id))
    kept, total = [], 0
    for doc in order:
        size = len(doc.text.encode("utf-8"))
        if total + size <= config.max_bytes_per_domain:
            kept.append(doc)
            total += size
    return kept


def split(docs: list[Document], config: CorpusConfig) -> dict[str, list[Document]]:
    """Assign each document to a split by a hash of its id alone, so the assignment survives cap or seed changes."""
    if len(docs) < len(SPLITS):
        raise ValueError(f"need at least {len(SPLITS)} documents to fill every split, got {len(docs)}")
    train_end = 1.0 - config.validation_fraction - config.test_fraction
    out: dict[str, list[Document]] = {s: [] for s in SPLITS}
    for doc in docs:
        u = _unit(f"split:{doc.id}")
        out[SPLITS[(u >= train_end) + (u >= train_end + config.validation_fraction)]].append(doc)
    for name in SPLITS:
        if not out[name]:
            donor = max(SPLITS, key=lambda s: len(out[s]))
            pick = min(out[donor], key=lambda d: _unit(f"{name}:{d.id}"))
            out[donor].remove(pick)
            out[name].append(pick)
    return out


def _write_jsonl(path: Path, docs: list[Document]) -> int:
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for doc in docs:
            f.write(json.dumps({"id": doc.id, "text": doc.text}, ensure_ascii=False) + "\n")
    return path.stat().st_size


def read_jsonl(path: Path) -> Iterator[Document]:
    with path.open(encoding="utf-8") as f:
        for line in f:
            obj = json.loads(line)
            yield Document(obj["id"], obj["text"])


def _counts(docs: list[Document]) -> dict[str, int]:
    return {"documents": len(docs), "bytes": sum(len(d.text.encode("utf-8")) for d in docs)}


def build_corpus(out: Path, config: CorpusConfig, log: Log = _stderr) -> dict:
    """Write every available domain under `out` and return the manifest (also written to out/manifest.json)."""
    unknown = set(config.domains) - set(_SOURCES)
    if unknown:
        raise ValueError(f"unknown domains {sorted(unknown)}; choose from {list(_SOURCES)}")
    out.mkdir(parents=True, exist_ok=True)
    # `install` only says how packages got here, not what was built, so it stays out of the reproducibility record.
    params = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items() if k != "install"}
    manifest: dict = {"parameters": params}  # lists, not tuples, so the returned manifest equals the JSON file
    manifest["domains"], manifest["skipped"] = {}, {}
    for name in sorted(config.domains):
        domain = _SOURCES[name]
        missing = [p for p in domain.packages if _dpkg_version(p) is None]
        if missing and not config.install:
            reason = f"Debian package(s) {' '.join(missing)} not installed and installing is off"
            log(f"WARNING: skipping domain {name}: {reason}")
            manifest["skipped"][name] = reason
            continue
        if missing:
            _install(missing, log)
        docs = domain.read(config)
        if len({d.id for d in docs}) != len(docs):
            raise RuntimeError(f"domain {name} produced duplicate document ids")
        docs = [d for d in docs if d.text.strip()]
        kept = sample(docs, config)
        parts = split(kept, config)
        (out / name).mkdir(exist_ok=True)
        entry: dict = {
            "source": domain.packages[0] if domain.packages else "python-stdlib",
            "version": _dpkg_version(domain.packages[0]) if domain.packages else platform.python_version(),
            "packages": {p: _dpkg_version(p) for p in domain.packages},
            "available": _counts(docs),
            "splits": {},
        }
        for s in SPLITS:
            file_bytes = _write_jsonl(out / name / f"{s}.jsonl", parts[s])
            entry["splits"][s] = _counts(parts[s]) | {"file_bytes": file_bytes}
        entry["total"] = _counts(kept)
        owner = _owner(domain.content()) if domain.content else None
        if owner:
            entry["packages"][owner] = _dpkg_version(owner)
        manifest["domains"][name] = entry
        log(f"{name}: {entry['total']['documents']} documents, {entry['total']['bytes']} bytes")
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.corpus", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--max-bytes-per-domain", type=int, default=CorpusConfig.max_bytes_per_domain)
    parser.add_argument("--no-install", action="store_true", help="skip domains whose Debian packages are missing")
    parser.add_argument("--domains", nargs="+", choices=DOMAINS, default=list(DOMAINS))
    parser.add_argument("--seed", type=int, default=CorpusConfig.seed, help="seed of the sampling order under the cap")
    args = parser.parse_args(argv)
    config = CorpusConfig(
        max_bytes_per_domain=args.max_bytes_per_domain,
        install=not args.no_install,
        domains=tuple(args.domains),
        seed=args.seed,
    )
    try:
        manifest = build_corpus(args.out, config)
    except (RuntimeError, ValueError) as e:
        print(f"training.corpus: error: {e}", file=sys.stderr)
        return 1
    if not manifest["domains"]:
        print("training.corpus: error: no domain was built", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
