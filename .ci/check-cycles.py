#!/usr/bin/env python3
"""Prints the crate's module graph and fails on an import cycle between
top-level modules.

Dependencies in the crate run one way (see the module map in src/lib.rs):
a lower module never names a higher one. This reads every `use crate::..`
and `crate::x::` reference (and `super::` paths that climb out of a module
directory) in src/, maps each file to its top-level module (src/x.rs and
src/x/**.rs are both `x`; the binary's `tunneler::x` references count for
`main`), and looks for strongly connected components.

Usage:
  check-cycles.py [SRC_DIR]      graph + cycles; exit 1 on any cycle
  check-cycles.py --self-test    runs the check on small synthetic trees
                                 and exits 1 unless it fails on each cycle
                                 and passes each acyclic tree

(check() can tolerate a listed set of known cycles, for a branch that is
removing one; the crate itself has none, and main passes none.)
"""

import os
import re
import sys
import tempfile

CRATE = "tunneler"


def strip_comments(text):
    """Drops // comments (doc comments included: an intra-doc link is not a
    dependency) and /* */ blocks; keeps `//` inside string literals such as
    URLs well enough for this purpose by requiring no ':' right before it."""
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    out = []
    for line in text.splitlines():
        m = re.search(r"(?<![:\"])//", line)
        if m:
            line = line[: m.start()]
        out.append(line)
    return "\n".join(out)


def module_path(rel):
    """src-relative file path -> module path list ([] for lib.rs/main.rs)."""
    parts = rel[:-3].split(os.sep)
    if parts[-1] == "mod":
        parts = parts[:-1]
    if parts in (["lib"], ["main"]):
        return []
    return parts


def group_heads(body):
    """Top-level paths of a `{a::b, c, d::{e, f}}` group body."""
    heads, depth, cur = [], 0, ""
    for ch in body:
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
        elif ch == "," and depth == 0:
            heads.append(cur.strip())
            cur = ""
            continue
        if depth == 0:
            cur += ch
    if cur.strip():
        heads.append(cur.strip())
    return [h for h in heads if h]


def references(text, roots):
    """Every path (as a list of segments) that starts at one of `roots`
    (crate, super, self, or the crate's name from the binary)."""
    refs = []
    root_re = "|".join(roots)
    # Grouped: `crate::{a, b::c}`.
    for m in re.finditer(r"\b(%s)((?:::super)*)::\{" % root_re, text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        prefix = [m.group(1)] + [s for s in m.group(2).split("::") if s]
        for head in group_heads(text[m.end() : i - 1]):
            refs.append(prefix + [s.strip() for s in head.split("::") if s.strip()])
    # Plain: `crate::a::B`, `super::super::x`.
    for m in re.finditer(r"\b(%s)((?:::[A-Za-z_][A-Za-z0-9_]*)+)" % root_re, text):
        refs.append([m.group(1)] + [s for s in m.group(2).split("::") if s])
    return refs


def resolve(path, here):
    """A reference path -> the top-level module it names, or None."""
    root, rest = path[0], path[1:]
    if root in ("crate", CRATE):
        return rest[0] if rest else None
    base = list(here)
    if root == "self":
        pass
    else:  # super
        base = base[:-1]
    while rest and rest[0] == "super":
        base = base[:-1]
        rest = rest[1:]
    full = base + rest
    return full[0] if full else None


def graph(src):
    files = []
    for dirpath, _, names in os.walk(src):
        for n in names:
            if n.endswith(".rs"):
                files.append(os.path.relpath(os.path.join(dirpath, n), src))
    modules = {module_path(f)[0] for f in files if module_path(f)}
    edges = {m: set() for m in modules}
    for f in sorted(files):
        here = module_path(f)
        text = strip_comments(open(os.path.join(src, f), encoding="utf-8").read())
        if f == "main.rs":
            me, roots = "main", [CRATE]
        elif not here:
            continue  # lib.rs: only module declarations
        else:
            me, roots = here[0], ["crate", "super", "self"]
        for ref in references(text, roots):
            to = resolve(ref, here)
            if to in modules and to != me:
                edges.setdefault(me, set()).add(to)
    return edges


def cycles(edges):
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return sorted(out)


def name(cycle):
    return " <-> ".join(cycle)


def check(src, known, out=sys.stdout):
    """Prints the graph and the verdict; returns the exit status."""
    edges = graph(src)
    print("module graph (module -> the top-level modules it uses):", file=out)
    for m in sorted(edges):
        print("  %-12s -> %s" % (m, ", ".join(sorted(edges[m])) or "-"), file=out)
    found = cycles(edges)
    status = 0
    for c in found:
        ties = [
            "%s -> %s" % (a, b) for a in c for b in sorted(edges[a]) if b in c
        ]
        if name(c) in known:
            print("KNOWN CYCLE (being removed): %s [%s]" % (name(c), "; ".join(ties)), file=out)
        else:
            print("CYCLE: %s [%s]" % (name(c), "; ".join(ties)), file=out)
            status = 1
    for k in sorted(known - {name(c) for c in found}):
        print("STALE: .ci/known-cycles lists %r, which no longer exists: delete its line" % k, file=out)
        status = 1
    if status == 0:
        print("no import cycle between top-level modules%s" % (
            " beyond the known ones" if found else ""), file=out)
    return status


def read_known(path):
    known = set()
    if os.path.exists(path):
        for line in open(path, encoding="utf-8"):
            line = line.split("#", 1)[0].strip()
            if line:
                known.add(line)
    return known


def self_test():
    """The check must fail on a cycle and pass an acyclic tree."""
    cases = [
        # (description, files, expected status, expected cycles)
        ("plain use, acyclic", {
            "lib.rs": "pub mod a; pub mod b;",
            "a.rs": "use crate::b::Thing;",
            "b.rs": "//! Uses [`crate::a::X`] in a doc link only.\npub struct Thing;",
        }, 0, []),
        ("two-module cycle through a path in an expression", {
            "a.rs": "use crate::b::Thing;",
            "b.rs": "fn f() { crate::a::g(); }",
        }, 1, [["a", "b"]]),
        ("three-module cycle through a grouped use", {
            "a.rs": "use crate::{b::X, c};",
            "b.rs": "use crate::c::Y;",
            "c.rs": "use crate::{\n    a::{Z, W},\n};",
        }, 1, [["a", "b", "c"]]),
        ("a directory is one module; super climbs out of it", {
            "ssh/mod.rs": "mod session;",
            "ssh/session.rs": "use super::super::tunnel::T;",
            "tunnel/mod.rs": "use crate::ssh::session::S;",
        }, 1, [["ssh", "tunnel"]]),
        ("super inside a directory stays in it", {
            "ssh/mod.rs": "mod session; mod keys;",
            "ssh/session.rs": "use super::keys::K;",
            "ssh/keys.rs": "pub struct K;",
            "tunnel.rs": "use crate::ssh::session;",
        }, 0, []),
        ("the binary's references count for main", {
            "main.rs": "use tunneler::a::run;",
            "a.rs": "pub fn run() {}",
        }, 0, []),
    ]
    failed = 0
    for desc, files, want_status, want_cycles in cases:
        with tempfile.TemporaryDirectory() as d:
            for rel, text in files.items():
                p = os.path.join(d, rel)
                os.makedirs(os.path.dirname(p), exist_ok=True)
                with open(p, "w", encoding="utf-8") as f:
                    f.write(text)
            with open(os.devnull, "w") as null:
                got_status = check(d, set(), out=null)
            got_cycles = cycles(graph(d))
            ok = got_status == want_status and got_cycles == want_cycles
            print("%s: %s (status %d, cycles %s)" % (
                "ok" if ok else "FAILED", desc, got_status, got_cycles))
            failed += not ok
    # A known cycle is tolerated; a known one that is gone fails.
    with tempfile.TemporaryDirectory() as d:
        for rel, text in {"a.rs": "use crate::b::X;", "b.rs": "use crate::a::Y;"}.items():
            with open(os.path.join(d, rel), "w", encoding="utf-8") as f:
                f.write(text)
        with open(os.devnull, "w") as null:
            tolerated = check(d, {"a <-> b"}, out=null)
            stale = check(d, {"a <-> b", "c <-> d"}, out=null)
        ok = tolerated == 0 and stale == 1
        print("%s: known cycles tolerated, stale ones fail (%d, %d)" % (
            "ok" if ok else "FAILED", tolerated, stale))
        failed += not ok
    return 1 if failed else 0


def main(argv):
    if argv[1:] == ["--self-test"]:
        return self_test()
    here = os.path.dirname(os.path.abspath(__file__))
    src = argv[1] if len(argv) > 1 else os.path.join(here, "..", "src")
    return check(src, set())


if __name__ == "__main__":
    sys.exit(main(sys.argv))
