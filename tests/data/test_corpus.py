"""The Debian corpus builder offline: fake unpacked packages stand in for downloads (and real
dpkg-source / dpkg-deb archives built here for the unpack step); the expected documents are spelled
out by hand, and the shards are read back with the project's shard reader."""

from __future__ import annotations

import gzip
import json
import lzma
import os
import shutil
import subprocess

import numpy as np
import pytest

from data_pipeline.corpus import Apt, Package, main, package_document, read_package_list, split_of, unpack, write_splits
from data_pipeline.corpus_text import MAX_FILE_BYTES, copyright_licences, html_to_text, licence_family
from data_pipeline.shards import BadSamples, DataError, open_shard_set, read_documents

DEP5 = """Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: foo

Files: *
Copyright: 2020 Someone
License: GPL-2+
 This program is free software.

Files: lib/compat/*
Copyright: 1999 Else
License: BSD-3-clause

Files: debian/*
License: GPL-2+

License: BSD-3-clause
 Redistribution and use in source and binary forms ...
"""


def write(root, rel, data):
    path = os.path.join(root, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode())
    return path


def source_tree(root, name="foo", body="int main(void) { return 0; }\n"):
    """A source package as dpkg-source leaves it, with files that must and must not be read."""
    write(root, "src/main.c", body)
    write(root, "README", "Foo — does things.\r\nSecond line")  # CRLF, no final newline, non-ASCII
    write(root, "Makefile.am", "bin_PROGRAMS = foo\n")
    write(root, "debian/copyright", DEP5)
    write(root, "lib/compat/strlcpy.c", "/* BSD */\n")
    write(root, "configure", "#! /bin/sh\n# generated\n")  # generated scaffolding
    write(root, ".pc/applied-patches", "fix.patch\n")  # quilt state
    write(root, "logo.png", b"\x89PNG\r\n\x1a\n\0\0")  # binary
    write(root, "latin1.txt", "caf\xe9".encode("latin-1"))  # not UTF-8
    write(root, "web/app.min.js", "var a=1;\n")
    write(root, "data/table.c", "x" * 6000 + "\n")  # one line longer than MAX_LINE_CHARS
    write(root, "big.txt", "y\n" * (MAX_FILE_BYTES // 2 + 1))  # over MAX_FILE_BYTES
    os.symlink("src/main.c", os.path.join(root, "link.c"))
    return root


def expected_source_text(title="Debian source package foo 1.0-1", body="int main(void) { return 0; }\n"):
    return (
        f"{title}\n"
        "\n==> Makefile.am <==\nbin_PROGRAMS = foo\n"
        "\n==> README <==\nFoo — does things.\nSecond line\n"
        f"\n==> debian/copyright <==\n{DEP5}"
        "\n==> lib/compat/strlcpy.c <==\n/* BSD */\n"
        f"\n==> src/main.c <==\n{body}"
    )


def test_source_document_order_filters_and_licences(tmp_path):
    tree = source_tree(str(tmp_path / "foo"))
    d = package_document(Package("src", "foo"), "1.0-1", tree, max_doc_bytes=10**6)
    assert d["record"] == {
        "id": "debian-src:foo",
        "text": expected_source_text(),
        "source": "debian-src foo 1.0-1",
        "licence": "GPL-2+, BSD-3-clause",
    }
    e = d["entry"]
    assert (e["package"], e["version"], e["licences"], e["licence_families"]) == (
        "foo",
        "1.0-1",
        ["GPL-2+", "BSD-3-clause"],
        ["BSD", "GPL"],
    )
    assert e["files"] == 5 and e["files_truncated"] == 0
    assert e["files_skipped"] == 6  # big.txt, configure, table.c, latin1.txt, logo.png, app.min.js (.pc not walked)
    assert e["bytes"] == len(expected_source_text().encode())


def test_document_stops_at_the_file_that_would_pass_the_limit(tmp_path):
    tree = source_tree(str(tmp_path / "foo"))
    full = expected_source_text()
    limit = full.index("\n==> lib/compat/strlcpy.c <==")  # room for everything before it, not for it
    d = package_document(Package("src", "foo"), "1.0-1", tree, max_doc_bytes=len(full[:limit].encode()))
    assert d["record"]["text"] == full[:limit]
    assert d["entry"]["files"] == 3 and d["entry"]["files_truncated"] == 2


def test_documentation_package_reads_manuals_and_converts_html(tmp_path):
    root = str(tmp_path / "doc")
    base = "usr/share/doc/foo-doc"
    write(root, f"{base}/copyright", "Copyright 2001 A.\n\nPermission is hereby granted, free of charge, ...\n")
    write(
        root,
        f"{base}/html/index.html",
        "<html><head><title>T</title><style>p{}</style></head><body><nav>menu</nav>"
        "<h1>Foo&amp;Bar</h1><p>Some\n   text <b>bold</b>.</p><script>x()</script>"
        "<pre>  a = 1\n  b = 2</pre><ul><li>one</li><li>two</li></ul></body></html>",
    )
    write(root, f"{base}/html/_static/basic.css", "body {}\n")
    write(root, f"{base}/html/_sources/index.rst.txt", "Foo\n===\n")  # duplicates the page
    write(root, f"{base}/changelog.Debian.gz", gzip.compress(b"foo (1.0-1) unstable\n", mtime=0))
    write(root, f"{base}/guide.txt.gz", gzip.compress(b"A guide.\n", mtime=0))
    write(root, f"{base}/html/pic.png", b"\x89PNG\0")
    write(root, "usr/share/doc-base/foo-doc", "Document: foo\n")
    d = package_document(Package("doc", "foo-doc"), "2.0", root, max_doc_bytes=10**6)
    page = "Foo&Bar\n\nSome text bold.\n\n  a = 1\n  b = 2\n\n* one\n* two\n"
    assert d["record"]["text"] == (
        "Debian documentation package foo-doc 2.0\n"
        f"\n==> {base}/copyright <==\nCopyright 2001 A.\n\nPermission is hereby granted, free of charge, ...\n"
        f"\n==> {base}/guide.txt.gz <==\nA guide.\n"
        f"\n==> {base}/html/index.html <==\n{page}"
        "\n==> usr/share/doc-base/foo-doc <==\nDocument: foo\n"
    )
    # changelog.Debian is not a manual page name: neither suffix nor an upper-case stem
    assert d["record"]["licence"] == "see debian/copyright: MIT/Expat"
    assert d["entry"]["licence_families"] == ["MIT/Expat"] and not d["entry"]["copyright_machine_readable"]


def test_html_to_text_keeps_preformatted_layout():
    assert html_to_text("<p>a\n\n b</p><pre>x\n\n\n  y</pre>&lt;tag&gt;") == "a b\n\nx\n\n  y\n\n<tag>\n"


def test_licence_names_and_families():
    assert copyright_licences(DEP5) == (["GPL-2+", "BSD-3-clause"], True)
    assert copyright_licences("This is in the public domain.\n") == (["public domain"], False)
    assert [licence_family(n) for n in ("LGPL-2.1+", "GPL-3", "Expat", "Apache-2.0", "PSF-2", "Zlib", "FSFAP")] == [
        "LGPL",
        "GPL",
        "MIT/Expat",
        "Apache",
        "PSF",
        "Zlib",
        "other",
    ]


def make_docs(tmp_path, n=12):
    """n small source packages, each from its own fake tree."""
    docs = []
    for i in range(n):
        tree = source_tree(str(tmp_path / f"p{i}"), body=f"int v{i} = {i};\n" * (i + 1))
        docs.append(package_document(Package("src", f"pkg{i}"), f"{i}.0-1", tree, max_doc_bytes=10**6))
    return docs


def read_split(path):
    with lzma.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_splits_are_deterministic_disjoint_and_fixed_by_id(tmp_path):
    docs = make_docs(tmp_path)
    m1 = write_splits(docs, str(tmp_path / "a"), heldout_fraction=0.3)
    m2 = write_splits(make_docs(tmp_path / "again"), str(tmp_path / "b"), heldout_fraction=0.3)
    for name in ("train.jsonl.xz", "heldout.jsonl.xz"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert m1["splits"] == m2["splits"]
    train = read_split(tmp_path / "a" / "train.jsonl.xz")
    held = read_split(tmp_path / "a" / "heldout.jsonl.xz")
    assert train and held and not {d["id"] for d in train} & {d["id"] for d in held}
    # every document once, in list order within its split, with its text unchanged
    by_id = {d["record"]["id"]: d["record"] for d in docs}
    assert sorted(d["id"] for d in train + held) == sorted(by_id)
    assert [d["id"] for d in train] == [r["id"] for r in by_id.values() if r["id"] in {t["id"] for t in train}]
    assert all(d == by_id[d["id"]] for d in train + held)
    # a document keeps its split when the others change (fewer packages, another order)
    m3 = write_splits(docs[::-2], str(tmp_path / "c"), heldout_fraction=0.3)
    split1 = {e["id"]: e["split"] for e in m1["documents"]}
    assert all(split1[e["id"]] == e["split"] for e in m3["documents"])
    assert m1["splits"]["heldout"]["tokens"] == sum(len(d["text"].encode()) for d in held)


def test_shards_hold_every_document_with_its_tokens(tmp_path):
    docs = make_docs(tmp_path)
    write_splits(docs, str(tmp_path / "text"), heldout_fraction=0.3)
    assert (
        main(["shards", "--text", str(tmp_path / "text"), "--out", str(tmp_path / "shards"), "--shard-size", "8KB"])
        == 0
    )
    for split in ("train", "heldout"):
        texts = [d["text"] for d in read_split(tmp_path / "text" / f"{split}.jsonl.xz")]
        ss = open_shard_set(str(tmp_path / "shards" / split))
        assert list(ss.doc_tokens) == [len(t.encode()) for t in texts]
        got = []
        for shard in range(len(ss.names)):
            wanted = np.arange(int(ss.n_docs[shard]))
            got += [
                bytes(ids.astype(np.uint8)).decode()
                for _, ids, _ in read_documents(ss, shard, wanted, 0, BadSamples("error"))
            ]
        assert got == texts
    assert sorted(os.listdir(tmp_path / "shards")) == ["heldout", "train"]  # the unpacked text is gone


def test_bad_input_is_named(tmp_path, capsys):
    lst = tmp_path / "list.txt"
    lst.write_text("# packages\nsrc zlib\nbin foo\n")
    with pytest.raises(DataError, match=r"list.txt:3: expected 'src NAME' or 'doc NAME', got 'bin foo'"):
        read_package_list(str(lst))
    lst.write_text("src zlib\ndoc zlib\nsrc zlib=1:1.2\n")
    with pytest.raises(DataError, match=r"list.txt:3: src zlib=1:1.2 is listed twice"):
        read_package_list(str(lst))
    assert main(["shards", "--text", str(tmp_path), "--out", str(tmp_path / "s")]) == 1
    assert "train.jsonl.xz: no such file" in capsys.readouterr().err
    (tmp_path / "train.jsonl.xz").write_bytes(b"not xz")
    assert main(["shards", "--text", str(tmp_path), "--out", str(tmp_path / "s")]) == 1
    assert "train.jsonl.xz: not a valid .xz file" in capsys.readouterr().err
    with pytest.raises(DataError, match="src foo: no copyright file"):
        package_document(Package("src", "foo"), "1", str(tmp_path), 100)


def test_split_of_spreads_ids():
    held = sum(split_of(f"debian-src:p{i}", 0.1) == "heldout" for i in range(2000))
    assert 140 < held < 260  # 10% of 2000, within about 4 standard deviations


def test_unpack_real_archives(tmp_path):
    """dpkg-source and dpkg-deb archives built here go through the same unpack as downloads."""
    src = tmp_path / "foo-1.0"
    source_tree(str(src))
    os.remove(src / "link.c")  # dpkg-source -b would keep it; the document skips symlinks anyway
    write(str(src), "debian/source/format", "3.0 (native)\n")
    write(
        str(src),
        "debian/control",
        "Source: foo\nMaintainer: A <a@example.org>\n\nPackage: foo\nArchitecture: all\nDescription: foo\n foo\n",
    )
    write(
        str(src),
        "debian/changelog",
        "foo (1.0) unstable; urgency=low\n\n  * Initial.\n\n -- A <a@example.org>  Thu, 01 Jan 2015 00:00:00 +0000\n",
    )
    shutil.rmtree(src / ".pc")
    subprocess.run(["dpkg-source", "-b", str(src)], cwd=tmp_path, check=True, capture_output=True)
    files = sorted(str(tmp_path / n) for n in os.listdir(tmp_path) if n.startswith("foo_"))
    assert unpack(Package("src", "foo"), files, str(tmp_path / "x")) == "1.0"
    d = package_document(Package("src", "foo"), "1.0", str(tmp_path / "x"), 10**6)
    assert d["record"]["text"].startswith("Debian source package foo 1.0\n\n==> Makefile.am <==\n")
    assert "\n==> debian/changelog <==\nfoo (1.0) unstable" in d["record"]["text"]

    pkg = tmp_path / "deb"
    write(
        str(pkg),
        "DEBIAN/control",
        "Package: foo-doc\nVersion: 2.0-3\nArchitecture: all\n"
        "Maintainer: A <a@example.org>\nDescription: docs\n docs\n",
    )
    write(str(pkg), "usr/share/doc/foo-doc/copyright", DEP5)
    write(str(pkg), "usr/share/doc/foo-doc/README", "Read me.\n")
    subprocess.run(
        ["dpkg-deb", "--build", "--root-owner-group", str(pkg), str(tmp_path / "foo-doc.deb")],
        check=True,
        capture_output=True,
    )
    assert unpack(Package("doc", "foo-doc"), [str(tmp_path / "foo-doc.deb")], str(tmp_path / "y")) == "2.0-3"
    d = package_document(Package("doc", "foo-doc"), "2.0-3", str(tmp_path / "y"), 10**6)
    assert "\n==> usr/share/doc/foo-doc/README <==\nRead me.\n" in d["record"]["text"]
    assert d["record"]["licence"] == "GPL-2+, BSD-3-clause"


def test_failed_download_leaves_no_partial_package(tmp_path):
    """apt with empty lists (no update, so no network) fails; nothing is left to pass for a download."""
    dest = str(tmp_path / "downloads" / "src" / "nosuchpackage")
    with pytest.raises(DataError, match="apt-get source --download-only nosuchpackage failed"):
        Apt(str(tmp_path / "apt")).download(Package("src", "nosuchpackage"), dest)
    assert not os.path.exists(dest)
