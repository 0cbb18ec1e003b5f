#!/usr/bin/env python3
"""The realistic OS-update pair of bench/delta.sh: a few Debian packages and
one binary changed in a rootfs tree sampled from this machine.

  os_update.py add TREE IMAGE_BYTES PLAN
      Picks 3-4 installed packages (from /var/lib/dpkg/info/*.list) that have
      a /usr/bin program, files under /usr/lib and /usr/share/doc, and copies
      every regular file of theirs under /usr into TREE (the v1 tree). Picks
      them, largest file count first, until their files are ~5 % of TREE's
      files (each package at most half of that, and at most 3 % of
      IMAGE_BYTES). Writes the list of their files (relative to TREE) to
      PLAN.
  os_update.py change TREE PLAN
      Makes the v2 tree in place: every file in PLAN is replaced by another
      real file of this machine that is not in TREE, of similar size (the
      closest size with the same suffix), as a new version of the package
      would be (new bytes throughout); and one more /usr/bin binary, not in
      PLAN, gets its .text section byte-patched (one byte in every 4 KiB, as
      relocated call targets after a small source change). Prints a summary.

Deterministic for a given machine: sorted listings, no randomness.
"""
import bisect
import os
import shutil
import struct
import sys


def tree_files(tree):
    out = []
    for root, _, files in os.walk(tree):
        for f in files:
            p = os.path.join(root, f)
            if os.path.isfile(p) and not os.path.islink(p):
                out.append(os.path.relpath(p, tree))
    return sorted(out)


def packages():
    info = "/var/lib/dpkg/info"
    pkgs = {}
    for name in sorted(os.listdir(info)):
        if not name.endswith(".list"):
            continue
        files = []
        with open(os.path.join(info, name), errors="replace") as f:
            for line in f:
                p = line.rstrip("\n")
                if not p.startswith("/usr/") or os.path.islink(p) or not os.path.isfile(p):
                    continue
                try:
                    size = os.path.getsize(p)
                except OSError:
                    continue
                if size < 8 * 1024 * 1024 and os.access(p, os.R_OK):
                    files.append((p[1:], size))
        pkgs[name[: -len(".list")]] = files
    return pkgs


def add(tree, image_bytes, plan):
    have = set(tree_files(tree))
    n_tree = len(have)
    cap = image_bytes * 3 // 100
    cands = []
    for name, files in packages().items():
        paths = [p for p, _ in files]
        total = sum(s for _, s in files)
        if (
            any(p.startswith("usr/bin/") for p in paths)
            and any(p.startswith("usr/lib/") for p in paths)
            and any(p.startswith("usr/share/doc/") for p in paths)
            and 0 < total <= cap
            and len(paths) >= 4
        ):
            cands.append((-len(paths), name, files))
    cands.sort()
    picked, files_out = [], []
    goal = n_tree * 5 // 100
    for _, name, files in cands:
        if len(picked) >= 4 or len(files_out) >= goal:
            break
        if len(files) > max(goal // 2, 4):
            continue  # 3-4 packages make the ~5 %, not one
        picked.append(name)
        files_out.extend(p for p, _ in files)
    for p in files_out:
        dst = os.path.join(tree, p)
        if p not in have:
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            shutil.copyfile("/" + p, dst)
    with open(plan, "w") as f:
        f.write("# packages: " + " ".join(picked) + "\n")
        for p in sorted(set(files_out)):
            f.write(p + "\n")
    print(f"packages {' '.join(picked)}: {len(set(files_out))} files")


def text_section(data):
    """(offset, size) of .text in an ELF64 little-endian file, or None."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return None
    shoff = struct.unpack_from("<Q", data, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    if shoff == 0 or shoff + shnum * shentsize > len(data):
        return None

    def sh(i):
        base = shoff + i * shentsize
        name, _, _, _, off, size = struct.unpack_from("<IIQQQQ", data, base)
        return name, off, size

    _, stroff, _ = sh(shstrndx)
    for i in range(shnum):
        name, off, size = sh(i)
        end = data.find(b"\0", stroff + name)
        if data[stroff + name : end] == b".text":
            return off, size
    return None


def change(tree, plan):
    with open(plan) as f:
        lines = [l.rstrip("\n") for l in f if l.strip()]
    header = lines[0]
    targets = lines[1:]
    in_tree = set(tree_files(tree))
    # The pool of replacements: this machine's /usr files not in the tree.
    pool = {}
    for root, _, files in os.walk("/usr"):
        for fn in files:
            p = os.path.join(root, fn)
            if p[1:] in in_tree or os.path.islink(p) or not os.path.isfile(p):
                continue
            try:
                size = os.path.getsize(p)
            except OSError:
                continue
            if 0 < size < 8 * 1024 * 1024 and os.access(p, os.R_OK):
                ext = os.path.splitext(fn)[1]
                pool.setdefault(ext, []).append((size, p))
                pool.setdefault("*", []).append((size, p))
    for v in pool.values():
        v.sort()
    used = set()
    old_bytes = new_bytes = 0
    for rel in targets:
        dst = os.path.join(tree, rel)
        size = os.path.getsize(dst)
        ext = os.path.splitext(rel)[1]
        cands = pool.get(ext) if len(pool.get(ext, [])) >= 8 else pool["*"]
        i = bisect.bisect_left(cands, (size, ""))
        best = None
        for j in sorted(range(max(0, i - 8), min(len(cands), i + 8)), key=lambda j: abs(cands[j][0] - size)):
            if cands[j][1] not in used:
                best = cands[j]
                break
        if best is None:
            continue
        used.add(best[1])
        shutil.copyfile(best[1], dst)
        old_bytes += size
        new_bytes += best[0]
    # One more binary, outside the packages: a rebuilt /usr/bin program.
    targets_set = set(targets)
    patched = None
    for rel in sorted(in_tree):
        if not rel.startswith("usr/bin/") or rel in targets_set:
            continue
        p = os.path.join(tree, rel)
        if os.path.getsize(p) < 256 * 1024:
            continue
        with open(p, "rb") as f:
            data = bytearray(f.read())
        t = text_section(data)
        if not t:
            continue
        off, size = t
        for at in range(off + 97, off + size, 4096):
            data[at] ^= 0x5A
        with open(p, "wb") as f:
            f.write(data)
        patched = (rel, len(data), size)
        break
    print(
        f"{header[2:]}; {len(targets)} package files replaced ({old_bytes} -> {new_bytes} bytes); "
        f"{patched[0] if patched else 'no binary'} .text byte-patched "
        f"({patched[2] if patched else 0} bytes of .text in {patched[1] if patched else 0}); "
        f"{len(targets) + (1 if patched else 0)} of {len(in_tree)} files changed"
    )


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "add":
        add(sys.argv[2], int(sys.argv[3]), sys.argv[4])
    elif len(sys.argv) == 4 and sys.argv[1] == "change":
        change(sys.argv[2], sys.argv[3])
    else:
        sys.exit(__doc__)
