"""A long-document corpus from Debian packages: fetch it where apt reaches the archive, build shards anywhere.

    python -m data_pipeline.corpus fetch --out DIR [--packages data_pipeline/corpus_packages.txt]
        [--target-tokens N] [--heldout-fraction 0.1] [--max-doc-bytes 1MB]
    python -m data_pipeline.corpus shards --text DIR --out SHARDS_DIR [--tokenizer bytes] [--shard-size 64MB]

fetch downloads each listed package (`src NAME`: a source package, `doc NAME`: a documentation
package) with apt into DIR/downloads, unpacks it and makes it one document (corpus_text.py), and
writes DIR/train.jsonl.xz, DIR/heldout.jsonl.xz (one {"id", "text", "source", "licence"} a line) and
DIR/manifest.json (per document: package, version, licences, split, size, the downloaded files'
sha256). The split is by document id alone. shards turns those two files into SHARDS_DIR/train and
SHARDS_DIR/heldout with the shard writer (make_shards.py); it needs no network.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence

from .corpus_text import copyright_licences, licence_family, tree_document
from .make_shards import format_summary, parse_size, write_shards
from .shards import DataError
from .tokenizer import load_tokenizer

PACKAGES_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus_packages.txt")
SPLITS = ("train", "heldout")
MANIFEST_NAME = "manifest.json"
SUITE = "bookworm"
ARCHIVE = "http://deb.debian.org/debian"
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
_KINDS = {"src": "Debian source package", "doc": "Debian documentation package"}
_XZ_PRESET = 9  # a 64 MiB window also finds the licence texts and headers that recur across packages


@dataclass(frozen=True)
class Package:
    kind: str  # "src" or "doc"
    name: str  # an apt name, optionally NAME=VERSION

    @property
    def doc_id(self) -> str:
        """Stable across versions, so a newer archive keeps every package in its split."""
        return f"debian-{self.kind}:{self.name.split('=')[0]}"


def read_package_list(path: str) -> List[Package]:
    """`KIND NAME` lines (KIND src or doc); `#` starts a comment."""
    out: List[Package] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            fields = line.split("#", 1)[0].split()
            if not fields:
                continue
            if len(fields) != 2 or fields[0] not in _KINDS:
                raise DataError(f"{path}:{lineno}: expected 'src NAME' or 'doc NAME', got {line.strip()!r}")
            pkg = Package(*fields)
            if any(p.doc_id == pkg.doc_id for p in out):
                raise DataError(f"{path}:{lineno}: {fields[0]} {fields[1]} is listed twice")
            out.append(pkg)
    if not out:
        raise DataError(f"{path}: lists no package")
    return out


def heldout_unit(doc_id: str) -> float:
    """A number in [0, 1) fixed by the document id; documents below the held-out fraction are held out."""
    return int.from_bytes(hashlib.blake2b(doc_id.encode(), digest_size=8).digest(), "little") / 2.0**64


def split_of(doc_id: str, heldout_fraction: float) -> str:
    return "heldout" if heldout_unit(doc_id) < heldout_fraction else "train"


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _control_field(text: str, name: str) -> str:
    for line in text.splitlines():
        if line.lower().startswith(name.lower() + ":"):
            return line.split(":", 1)[1].strip()
    raise DataError(f"no {name} field")


def package_document(pkg: Package, version: str, tree: str, max_doc_bytes: int, downloads: Sequence[str] = ()) -> dict:
    """The document of an unpacked package (`tree`: a source tree, or a documentation package's
    file system), with its manifest entry. The licences come from the tree's copyright file."""
    doc = pkg.kind == "doc"
    base = pkg.name.split("=")[0]
    copyright_path = os.path.join(tree, f"usr/share/doc/{base}/copyright" if doc else "debian/copyright")
    if not os.path.isfile(copyright_path):
        raise DataError(f"{pkg.kind} {pkg.name}: no copyright file ({os.path.relpath(copyright_path, tree)})")
    with open(copyright_path, encoding="utf-8", errors="replace") as f:
        licences, machine_readable = copyright_licences(f.read())
    built = tree_document(tree, f"{_KINDS[pkg.kind]} {base} {version}", max_doc_bytes, doc=doc)
    licence = ", ".join(licences) if machine_readable else "see debian/copyright: " + ", ".join(licences)
    record = {"id": pkg.doc_id, "text": built.text, "source": f"debian-{pkg.kind} {base} {version}", "licence": licence}
    entry = {
        "id": pkg.doc_id,
        "kind": pkg.kind,
        "package": base,
        "version": version,
        "licences": licences,
        "licence_families": sorted({licence_family(n) for n in licences}),
        "copyright_machine_readable": machine_readable,
        "bytes": len(built.text.encode()),
        "files": len(built.files),
        "files_skipped": built.skipped,
        "files_truncated": built.truncated,
        "downloads": {os.path.basename(p): _sha256(p) for p in downloads},
    }
    return {"record": record, "entry": entry}


def write_splits(
    docs: Iterable[dict],
    out_dir: str,
    heldout_fraction: float,
    tokenizer: str = "bytes",
    unavailable: Sequence[dict] = (),
) -> dict:
    """DIR/train.jsonl.xz, DIR/heldout.jsonl.xz and DIR/manifest.json from package_document() results, in
    the given order. The same documents give byte-identical files. `unavailable`: listed packages that
    could not be downloaded ({"id", "error"}). Returns the manifest."""
    tok = load_tokenizer(tokenizer)
    os.makedirs(out_dir, exist_ok=True)
    lines: Dict[str, List[bytes]] = {s: [] for s in SPLITS}
    entries = []
    for d in docs:
        rec = d["record"]
        split = split_of(rec["id"], heldout_fraction)
        entry = dict(d["entry"], split=split, tokens=int(len(tok.encode_batch([rec["text"]])[0])))
        lines[split].append(json.dumps(rec, ensure_ascii=False).encode() + b"\n")
        entries.append(entry)
    if len({e["id"] for e in entries}) != len(entries):
        raise DataError("two documents have the same id")
    manifest = {
        "suite": SUITE,
        "archive": ARCHIVE,
        "heldout_fraction": heldout_fraction,
        "tokenizer": tok.spec(),
        "splits": {},
        "documents": entries,
        "unavailable": list(unavailable),
    }
    for split in SPLITS:
        data = lzma.compress(b"".join(lines[split]), preset=_XZ_PRESET)
        _write_atomic(os.path.join(out_dir, f"{split}.jsonl.xz"), data)
        counts = [e["tokens"] for e in entries if e["split"] == split]
        manifest["splits"][split] = {
            "file": f"{split}.jsonl.xz",
            "documents": len(counts),
            "tokens": sum(counts),
            "xz_bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
        }
    _write_atomic(os.path.join(out_dir, MANIFEST_NAME), (json.dumps(manifest, indent=1) + "\n").encode())
    return manifest


def _write_atomic(path: str, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


class Apt:
    """apt-get with its own sources (deb and deb-src of the suite), lists and cache under `root`,
    so the system's apt configuration stays untouched."""

    def __init__(self, root: str):
        self.root = os.path.abspath(root)
        for d in ("lists/partial", "cache/archives/partial", "preferences.d"):
            os.makedirs(os.path.join(self.root, d), exist_ok=True)
        sources = os.path.join(self.root, "sources.list")
        with open(sources, "w") as f:
            for kind in ("deb", "deb-src"):
                f.write(f"{kind} [signed-by={KEYRING}] {ARCHIVE} {SUITE} main\n")
        self.options = [
            "-o",
            f"Dir::Etc::SourceList={sources}",
            "-o",
            "Dir::Etc::SourceParts=/nonexistent",
            "-o",
            f"Dir::State::Lists={self.root}/lists",
            "-o",
            f"Dir::Cache={self.root}/cache",
            "-o",
            "Dir::Etc::Preferences=/nonexistent",
            "-o",
            f"Dir::Etc::PreferencesParts={self.root}/preferences.d",
            # Downloads land in directories of ours, which apt's unprivileged user may not write.
            "-o",
            "APT::Sandbox::User=root",
            "-q",
        ]

    def run(self, args: List[str], cwd: Optional[str] = None) -> None:
        r = subprocess.run(["apt-get", *self.options, *args], cwd=cwd, capture_output=True, text=True)
        if r.returncode:
            raise DataError(f"apt-get {' '.join(args)} failed: {r.stderr.strip()[-2000:]}")

    def update(self) -> None:
        self.run(["update"])

    def download(self, pkg: Package, dest: str) -> List[str]:
        """The package's files in `dest`, downloaded unless `dest` exists (it is made only when the
        download is complete), sorted."""
        want = ".dsc" if pkg.kind == "src" else ".deb"
        if not os.path.isdir(dest):
            part = dest + ".part"
            shutil.rmtree(part, ignore_errors=True)
            os.makedirs(part)
            self.run(["source", "--download-only", pkg.name] if pkg.kind == "src" else ["download", pkg.name], cwd=part)
            os.replace(part, dest)
        files = sorted(os.path.join(dest, n) for n in os.listdir(dest) if not n.startswith("."))
        if sum(f.endswith(want) for f in files) != 1:
            raise DataError(f"{dest}: expected one {want} file, found {[os.path.basename(f) for f in files]}")
        return files


def unpack(pkg: Package, files: Sequence[str], dest: str) -> str:
    """Unpacks a downloaded package into `dest` (which must not exist); returns its version."""
    if pkg.kind == "src":
        dsc = next(f for f in files if f.endswith(".dsc"))
        cmd = ["dpkg-source", "--no-copy", "-x", dsc, dest]
        with open(dsc, encoding="utf-8", errors="replace") as f:
            version = _control_field(f.read(), "Version")
    else:
        deb = next(f for f in files if f.endswith(".deb"))
        cmd = ["dpkg-deb", "-x", deb, dest]
        version = subprocess.run(
            ["dpkg-deb", "-f", deb, "Version"], capture_output=True, text=True, check=True
        ).stdout.strip()
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise DataError(f"{' '.join(cmd)} failed: {r.stderr.strip()[-2000:]}")
    return version


def fetch(
    out_dir: str,
    packages: Sequence[Package],
    target_tokens: Optional[int] = None,
    heldout_fraction: float = 0.1,
    max_doc_bytes: int = 1_000_000,
    log=print,
) -> dict:
    """Downloads, unpacks and converts the packages in list order (until `target_tokens` bytes-tokenizer
    tokens when given), then writes the splits and the manifest. Downloads stay in DIR/downloads, so
    a second run converts without the network (delete them to fetch newer versions)."""
    t0 = time.perf_counter()
    apt = Apt(os.path.join(out_dir, "apt"))
    log(f"apt-get update ({SUITE} main, deb and deb-src)")
    apt.update()
    docs, unavailable, total = [], [], 0
    for i, pkg in enumerate(packages):
        if target_tokens is not None and total >= target_tokens:
            break
        dest = os.path.join(out_dir, "downloads", pkg.kind, pkg.name.split("=")[0])
        try:
            files = apt.download(pkg, dest)
        except DataError as e:
            # The archive moves under a stable list (a file of a superseded version gone): go on without it.
            unavailable.append({"id": pkg.doc_id, "error": str(e)[-500:]})
            log(f"[{i + 1}/{len(packages)}] {pkg.kind} {pkg.name}: not available, left out ({e})")
            continue
        with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
            tree = os.path.join(tmp, "tree")
            version = unpack(pkg, files, tree)
            d = package_document(pkg, version, tree, max_doc_bytes, files)
        docs.append(d)
        total += d["entry"]["bytes"]
        e = d["entry"]
        log(
            f"[{i + 1}/{len(packages)}] {pkg.kind} {e['package']} {version}: {e['bytes'] / 1e6:.2f} MB, "
            f"{e['files']} files ({e['files_skipped']} not text, {e['files_truncated']} past the limit); "
            f"{total / 1e6:.1f} MB in all"
        )
    manifest = write_splits(docs, out_dir, heldout_fraction, unavailable=unavailable)
    log(f"fetched and written in {time.perf_counter() - t0:.0f} s")
    return manifest


def build_shards(
    text_dir: str, out_dir: str, tokenizer: str = "bytes", shard_size: str = "64MB", overwrite: bool = False
) -> Dict[str, dict]:
    """OUT/train and OUT/heldout: shard sets of the two splits. Each split's text is unpacked next to
    them for the writer and removed after."""
    os.makedirs(out_dir, exist_ok=True)
    summaries = {}
    for split in SPLITS:
        src = os.path.join(text_dir, f"{split}.jsonl.xz")
        if not os.path.isfile(src):
            raise DataError(f"{src}: no such file (write it with: python -m data_pipeline.corpus fetch)")
        plain = os.path.join(out_dir, f"{split}.jsonl")
        try:
            with lzma.open(src, "rb") as fin, open(plain, "wb") as fout:
                shutil.copyfileobj(fin, fout, 1 << 20)
        except lzma.LZMAError as e:
            raise DataError(f"{src}: not a valid .xz file ({e})") from None
        try:
            summaries[split] = write_shards(
                [plain],
                os.path.join(out_dir, split),
                tokenizer,
                shard_size=shard_size,
                overwrite=overwrite,
                progress=False,
            )
        finally:
            os.remove(plain)
    return summaries


def describe(manifest: dict) -> str:
    docs = manifest["documents"]
    tokens = [e["tokens"] for e in docs]
    lines = [f"{len(docs)} documents, {sum(tokens):,} tokens ({manifest['tokenizer']['kind']} tokenizer)"]
    for split, s in manifest["splits"].items():
        sizes = [e["tokens"] for e in docs if e["split"] == split]
        lines.append(
            f"  {split}: {s['documents']} documents, {s['tokens']:,} tokens, {s['xz_bytes'] / 2**20:.1f} MiB "
            f"xz; >= 32K: {sum(n >= 32 << 10 for n in sizes)}, >= 256K: {sum(n >= 256 << 10 for n in sizes)}"
            f", >= 1M: {sum(n >= 1 << 20 for n in sizes)}"
        )
    families = Counter(f for e in docs for f in e["licence_families"])
    lines.append("licence families (documents): " + ", ".join(f"{k} {v}" for k, v in families.most_common()))
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m data_pipeline.corpus", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    f = sub.add_parser("fetch", help="download the packages and write the compressed text splits")
    f.add_argument("--out", required=True, metavar="DIR")
    f.add_argument("--packages", default=PACKAGES_FILE, help="the package list (default: %(default)s)")
    f.add_argument("--target-tokens", type=int, help="stop after the package that reaches this many tokens")
    f.add_argument("--heldout-fraction", type=float, default=0.1)
    f.add_argument("--max-doc-bytes", default="1MB", help="a document ends at the file that would pass this")
    s = sub.add_parser("shards", help="write train and held-out shard sets from the text splits (no network)")
    s.add_argument("--text", required=True, metavar="DIR", help="fetch's output directory")
    s.add_argument("--out", required=True, metavar="SHARDS_DIR")
    s.add_argument("--tokenizer", default="bytes", metavar="TOK", help="'bytes' or a tokenizer.json")
    s.add_argument("--shard-size", default="64MB")
    s.add_argument("--overwrite", action="store_true")
    a = ap.parse_args(argv)
    try:
        if a.command == "fetch":
            if not 0 <= a.heldout_fraction < 1:
                ap.error(f"--heldout-fraction must be in [0, 1), not {a.heldout_fraction}")
            manifest = fetch(
                a.out,
                read_package_list(a.packages),
                a.target_tokens,
                a.heldout_fraction,
                parse_size(a.max_doc_bytes),
                log=lambda m: print(m, file=sys.stderr),
            )
            print(describe(manifest), file=sys.stderr)
        else:
            for split, summary in build_shards(a.text, a.out, a.tokenizer, a.shard_size, a.overwrite).items():
                print(f"{split}: {format_summary(summary)}", file=sys.stderr)
    except (DataError, FileNotFoundError, ValueError) as e:
        print(f"corpus: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
