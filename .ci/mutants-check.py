#!/usr/bin/env python3
"""Fails when a mutant survived that the allowlist does not explain.

Usage: mutants-check.py ALLOWLIST MUTANTS_OUT_DIR...

cargo-mutants names a mutant by file, line and column, which shift with
every edit. An allowlist entry instead names the file, the source line as
written (whitespace-trimmed) and the mutation:

    src/proxy/pool.rs | Some(if load(b) < load(a) { b } else { a }) | replace < with <= in pick_two

Every entry needs a `# reason` comment right above it. An entry whose line
is edited stops matching, so the surviving mutant must be looked at again.
Mutants that time out count as caught (the tests did not pass); they are
listed for information.
"""

import re
import sys
from pathlib import Path

NAME = re.compile(r"^(?P<file>[^:]+):(?P<line>\d+):(?P<col>\d+): (?P<what>.+)$")


def load_allowlist(path):
    entries, reason, in_comment = {}, None, False
    for n, raw in enumerate(Path(path).read_text().splitlines(), 1):
        line = raw.strip()
        if not line:
            reason, in_comment = None, False
            continue
        if line.startswith("#"):
            text = line.lstrip("#").strip()
            reason = f"{reason} {text}" if in_comment and reason else text
            in_comment = True
            continue
        in_comment = False
        if not reason:
            sys.exit(f"{path}:{n}: allowlist entry without a '# reason' line above it")
        parts = [p.strip() for p in line.split(" | ")]
        if len(parts) != 3:
            sys.exit(f"{path}:{n}: expected 'file | source line | mutation'")
        entries[tuple(parts)] = reason
    return entries


def key(name):
    m = NAME.match(name)
    if not m:
        sys.exit(f"unexpected mutant name: {name!r}")
    lines = Path(m["file"]).read_text().splitlines()
    src = lines[int(m["line"]) - 1].strip()
    return (m["file"], src, m["what"])


def read(out, name):
    p = Path(out) / "mutants.out" / name
    return [l for l in p.read_text().splitlines() if l.strip()] if p.exists() else []


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    allow = load_allowlist(sys.argv[1])
    used, unexplained, counts = set(), [], {}
    for out in sys.argv[2:]:
        for kind in ("caught", "missed", "timeout", "unviable"):
            counts[kind] = counts.get(kind, 0) + len(read(out, f"{kind}.txt"))
        for name in read(out, "timeout.txt"):
            print(f"timed out (counts as caught): {name}")
        for name in read(out, "missed.txt"):
            k = key(name)
            if k in allow:
                used.add(k)
                print(f"survived, allowlisted ({allow[k]}): {name}")
            else:
                unexplained.append((name, k))
    print(
        "mutants: {caught} caught, {timeout} timed out, {unviable} unviable, "
        "{missed} survived".format(**counts)
    )
    for k in sorted(set(allow) - used):
        print(f"note: allowlist entry matched no surviving mutant (now caught?): {' | '.join(k)}")
    if unexplained:
        print(f"\n{len(unexplained)} mutant(s) survived that no test catches and the allowlist does not explain:")
        for name, k in unexplained:
            print(f"  {name}\n    allowlist form: {' | '.join(k)}")
        print("Add a test that fails for each, or (if it cannot matter) an allowlist entry with its reason.")
        return 1
    if counts["caught"] + counts["timeout"] == 0:
        print("no mutant was caught: the mutation pass tested nothing")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
