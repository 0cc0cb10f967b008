"""One package's files as one document: which files count as text, their order, HTML to text, and
the licences a Debian copyright file declares. No network: corpus.py downloads and unpacks.

A document is a title line, then every text file of the tree in sorted path order, each after a
`==> path <==` line, cut at a file boundary once it holds `max_bytes` UTF-8 bytes.
"""

from __future__ import annotations

import gzip
import os
import re
from dataclasses import dataclass, field
from html.parser import HTMLParser
from typing import List, Optional, Tuple

# Version-control, quilt and build-cache state, not source.
_SKIP_DIRS = {".git", ".hg", ".svn", ".bzr", ".pc", "__pycache__"}
# Sphinx output: the reST sources duplicate the pages, the rest is theme and images.
_SKIP_DOC_DIRS = _SKIP_DIRS | {"_sources", "_static", "_images"}
# Generated build scaffolding that repeats across packages and teaches nothing about the package.
_GENERATED_NAMES = {
    "configure",
    "config.guess",
    "config.sub",
    "ltmain.sh",
    "aclocal.m4",
    "Makefile.in",
    "install-sh",
    "depcomp",
    "missing",
    "compile",
    "test-driver",
    "ylwrap",
    "mdate-sh",
    "texinfo.tex",
    "config.rpath",
    "libtool.m4",
    "ltoptions.m4",
    "ltsugar.m4",
    "ltversion.m4",
    "lt~obsolete.m4",
    "package-lock.json",
    "yarn.lock",
}
_SKIP_SUFFIXES = (".svg", ".min.js", ".min.css", ".map", ".eps", ".ps", ".pdf", ".xpm", ".pbm", ".pgm", ".ppm")
# Documentation packages: only these (after a .gz is opened) are read; HTML is converted to text.
_DOC_SUFFIXES = (".html", ".htm", ".xhtml", ".txt", ".text", ".rst", ".md", ".pod", ".info")
_HTML_SUFFIXES = (".html", ".htm", ".xhtml")
MAX_FILE_BYTES = 1_000_000
# A longer line marks minified code or a data table.
MAX_LINE_CHARS = 5000


@dataclass
class TreeDocument:
    text: str
    files: List[str] = field(default_factory=list)  # in document order
    skipped: int = 0  # files that are not text (binary, not UTF-8, too large, generated, minified)
    truncated: int = 0  # text files left out because the document was full


def tree_files(root: str, doc: bool = False) -> List[str]:
    """Regular files under `root` as relative POSIX paths, sorted by path; symlinks and version-control,
    quilt and cache directories left out."""
    skip = _SKIP_DOC_DIRS if doc else _SKIP_DIRS
    out = []
    for dirpath, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in skip and not os.path.islink(os.path.join(dirpath, d))]
        rel = os.path.relpath(dirpath, root)
        for n in names:
            if not os.path.islink(os.path.join(dirpath, n)):
                out.append(n if rel == "." else f"{rel}/{n}".replace(os.sep, "/"))
    return sorted(out, key=lambda p: p.split("/"))


def file_text(path: str, rel: str, doc: bool = False) -> Optional[str]:
    """The file's text, or None when it does not belong in the corpus. A documentation package reads
    only documentation files (gzipped or not) and converts HTML to text."""
    name = rel.rsplit("/", 1)[-1]
    if not doc and (name in _GENERATED_NAMES or name.endswith(_SKIP_SUFFIXES)):
        return None
    gzipped = doc and name.endswith(".gz")
    name = name[:-3] if gzipped else name
    # README, NEWS, copyright, README.Debian, ...: no suffix, or an upper-case stem
    if doc and not (name.endswith(_DOC_SUFFIXES) or "." not in name or name.split(".")[0].isupper()):
        return None
    if os.path.getsize(path) > MAX_FILE_BYTES:
        return None
    try:
        with (gzip.open if gzipped else open)(path, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except (OSError, EOFError):  # a damaged .gz
        return None
    if len(data) > MAX_FILE_BYTES:
        return None
    if b"\0" in data:
        return None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if doc and name.endswith(_HTML_SUFFIXES):
        text = html_to_text(text)
    text = text.replace("\r\n", "\n")
    if not text.strip() or max(map(len, text.split("\n"))) > MAX_LINE_CHARS:
        return None
    return text


def tree_document(root: str, title: str, max_bytes: int, doc: bool = False) -> TreeDocument:
    """`title`, then each text file of the tree under a `==> path <==` line, in sorted path order, up
    to `max_bytes` UTF-8 bytes (a file that would pass the limit and every later one are left out)."""
    parts = [title.rstrip("\n") + "\n"]
    size = len(parts[0].encode())
    out = TreeDocument("")
    for rel in tree_files(root, doc):
        text = file_text(os.path.join(root, rel), rel, doc)
        if text is None:
            out.skipped += 1
            continue
        if out.truncated:
            out.truncated += 1
            continue
        part = f"\n==> {rel} <==\n{text}" + ("" if text.endswith("\n") else "\n")
        n = len(part.encode())
        if size + n > max_bytes:
            out.truncated += 1
            continue
        parts.append(part)
        size += n
        out.files.append(rel)
    out.text = "".join(parts)
    return out


_BLOCK = {
    "p",
    "div",
    "section",
    "article",
    "table",
    "tr",
    "ul",
    "ol",
    "dl",
    "blockquote",
    "pre",
    "figure",
    "h1",
    "h2",
    "h3",
    "h4",
    "h5",
    "h6",
    "hr",
    "header",
    "footer",
    "main",
    "aside",
}
_LINE = {"br", "li", "dt", "dd", "th", "td", "caption", "title"}
_HIDDEN = {"script", "style", "head", "nav", "noscript", "template"}


class _TextExtractor(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: List[str] = []
        self.hidden = 0
        self.pre = 0

    def handle_starttag(self, tag, attrs):
        if tag in _HIDDEN:
            self.hidden += 1
        elif tag == "pre":
            self.pre += 1
        if tag in _BLOCK:
            self.parts.append("\n\n")
        elif tag in _LINE:
            self.parts.append("\n* " if tag == "li" else "\n")

    def handle_startendtag(self, tag, attrs):
        if tag in ("br", "hr"):
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if tag in _HIDDEN:
            self.hidden = max(0, self.hidden - 1)
        elif tag == "pre":
            self.pre = max(0, self.pre - 1)
        if tag in _BLOCK:
            self.parts.append("\n\n")

    def handle_data(self, data):
        if self.hidden:
            return
        self.parts.append(data if self.pre else re.sub(r"\s+", " ", data))


def html_to_text(html: str) -> str:
    """The visible text of an HTML page: blocks become paragraphs, <pre> keeps its layout, scripts,
    styles, the head and navigation are dropped."""
    p = _TextExtractor()
    p.feed(html)
    p.close()
    lines = [line.rstrip() for line in "".join(p.parts).split("\n")]
    text = "\n".join(lines)
    return re.sub(r"\n{3,}", "\n\n", text).strip("\n") + "\n"


def copyright_licences(text: str) -> Tuple[List[str], bool]:
    """The licence names a debian/copyright file declares, the `Files: *` one first, and whether the
    file is machine-readable (DEP-5). Otherwise the families that its text names (licence_family)."""
    paragraphs = [p for p in re.split(r"\n\s*\n", text.replace("\r\n", "\n")) if p.strip()]
    if not paragraphs or not re.match(r"(?i)format\s*:", paragraphs[0].lstrip()):
        return sorted({f for f in _FAMILY_PHRASES if re.search(_FAMILY_PHRASES[f], text, re.I)}), False
    main, others = [], []
    for para in paragraphs:
        files = re.search(r"(?im)^files\s*:\s*(.*)$", para)
        lic = re.search(r"(?im)^license\s*:[ \t]*(.*)$", para)
        if files and lic and lic.group(1).strip():
            target = main if files.group(1).split()[:1] == ["*"] else others
            target.append(lic.group(1).strip())
    names = []
    for name in main + others:
        if name not in names:
            names.append(name)
    return names, True


# Family of a DEP-5 licence name (the first pattern that matches wins) ...
_FAMILY_NAMES = [
    ("AGPL", r"agpl"),
    ("LGPL", r"lgpl"),
    ("GFDL", r"gfdl"),
    ("GPL", r"gpl"),
    ("Apache", r"apache"),
    ("BSD", r"bsd"),
    ("MIT/Expat", r"\bmit\b|expat|\bx11\b"),
    ("ISC", r"\bisc\b"),
    ("PSF", r"psf|python"),
    ("Artistic", r"artistic"),
    ("MPL", r"mpl"),
    ("Zlib", r"zlib"),
    ("public domain", r"public.?domain"),
    ("CC0", r"cc0"),
    ("Creative Commons", r"cc-by"),
    ("PostgreSQL", r"postgres"),
    ("OpenSSL", r"openssl|ssleay"),
    ("Unicode", r"unicode"),
]
# ... and the phrases that name a family in a copyright file that is not machine-readable.
_FAMILY_PHRASES = {
    "GPL": r"GNU General Public License",
    "LGPL": r"GNU (Lesser|Library) General Public",
    "GFDL": r"GNU Free Documentation License",
    "Apache": r"Apache License",
    "BSD": r"Redistribution and use in source and binary forms",
    "MIT/Expat": r"Permission is hereby granted, free of charge",
    "Artistic": r"Artistic License",
    "PSF": r"Python Software Foundation License",
    "public domain": r"public domain",
    "PostgreSQL": r"PostgreSQL (Database Management System|Global Development Group)",
    "MPL": r"Mozilla Public License",
    "Zlib": r"the origin of this software must not be misrepresented",
}


def licence_family(name: str) -> str:
    """A licence name's family ('GPL-2+' -> 'GPL', 'BSD-3-clause' -> 'BSD'); a family name stays."""
    if name in _FAMILY_PHRASES:
        return name
    for family, pattern in _FAMILY_NAMES:
        if re.search(pattern, name, re.I):
            return family
    return "other"
