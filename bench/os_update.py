#!/usr/bin/env python3
"""The OS-update pair of bench/delta.sh: the edits debootstrap cannot make.

  os_update.py rebuild V1 V2
      "Rebuilds" one binary of V2: the largest ELF file under usr/ that is
      the same in V1 and V2 gets one byte of its .text changed in every
      4 KiB (as relocated call targets after a small source change) and a
      new GNU build ID. Prints what it changed.
  os_update.py config TREE
      Changes one configuration file: etc/login.defs, UMASK 022 -> 027.
      Prints what it changed.

Deterministic: sorted listings, no randomness.
"""
import os
import struct
import sys


def section(data, wanted):
    """(offset, size) of section `wanted` in an ELF64 little-endian file, or None."""
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
        if data[stroff + name : end] == wanted:
            return off, size
    return None



def same(a, b):
    if os.path.getsize(a) != os.path.getsize(b):
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(1 << 20), fb.read(1 << 20)
            if x != y:
                return False
            if not x:
                return True


def rebuild(v1, v2):
    cands = []
    for root, _, files in os.walk(os.path.join(v2, "usr")):
        for fn in files:
            p = os.path.join(root, fn)
            if os.path.islink(p) or not os.path.isfile(p):
                continue
            with open(p, "rb") as f:
                if f.read(4) != b"\x7fELF":
                    continue
            rel = os.path.relpath(p, v2)
            cands.append((-os.path.getsize(p), rel))
    for _, rel in sorted(cands):
        old, new = os.path.join(v1, rel), os.path.join(v2, rel)
        if not os.path.isfile(old) or os.path.islink(old) or not same(old, new):
            continue
        with open(new, "rb") as f:
            data = bytearray(f.read())
        text = section(data, b".text")
        if not text:
            continue
        off, size = text
        for at in range(off + 97, off + size, 4096):
            data[at] ^= 0x5A
        note = section(data, b".note.gnu.build-id")
        if note and note[1] >= 36:  # 16-byte header, 20-byte ID
            for at in range(note[0] + 16, note[0] + 36):
                data[at] ^= 0xA5
        with open(new, "r+b") as f:
            f.write(data)
        print(f"{rel} ({len(data)} bytes): .text byte-patched ({size} bytes of .text), new build ID")
        return
    sys.exit("os_update.py: no ELF file with a .text section is the same in both roots")


def config(tree):
    path = os.path.join(tree, "etc/login.defs")
    with open(path) as f:
        text = f.read()
    new = text.replace("UMASK\t\t022", "UMASK\t\t027", 1)
    if new == text:
        sys.exit(f"os_update.py: no 'UMASK<tab><tab>022' line in {path}")
    with open(path, "w") as f:
        f.write(new)
    print("etc/login.defs: UMASK 022 -> 027")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "rebuild":
        rebuild(sys.argv[2], sys.argv[3])
    elif len(sys.argv) == 3 and sys.argv[1] == "config":
        config(sys.argv[2])
    else:
        sys.exit(__doc__)
