#!/usr/bin/env python3
"""Lists the module imports of a crate (`use crate::...` and `use super::...`, by file) and
fails when two modules import each other, directly or through others (issue 19's layering
rule). A module's own children declared with `mod` are not imports.

    python3 scripts/dev/module_cycles.py trainers/src
"""
import pathlib
import re
import sys

root = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "trainers/src")


def module_of(path):
    rel = path.relative_to(root).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] in ("mod", "lib"):
        parts = parts[:-1]
    return "::".join(parts) or "crate"


files = {module_of(p): p for p in root.rglob("*.rs")}


def resolve(name, here):
    """The longest known module that `name` (a path inside the crate) lies in."""
    parts = name.split("::")
    while parts:
        m = "::".join(parts)
        if m in files:
            return m
        parts = parts[:-1]
    return None


edges = {m: set() for m in files}
use_re = re.compile(r"^\s*(?:pub(?:\([a-z]+\))?\s+)?use\s+(crate|super)::([A-Za-z0-9_:]+)", re.M)
inline_re = re.compile(r"\b(crate|super)::([a-z0-9_]+(?:::[a-z0-9_]+)*)::")
for m, path in files.items():
    text = path.read_text()
    # Tests may reach anywhere.
    text = text.split("#[cfg(test)]")[0]
    # Comments name modules without importing them.
    text = re.sub(r"//.*", "", text)
    here = m.split("::") if m != "crate" else []
    is_mod_file = path.name in ("mod.rs", "lib.rs")
    for kind, rest in use_re.findall(text) + inline_re.findall(text):
        if kind == "crate":
            target = rest
        else:
            parent = here if is_mod_file else here[:-1]
            parent = parent[:-1] if is_mod_file else parent
            target = "::".join(parent + [rest]) if parent else rest
        t = resolve(target, m)
        if t and t != m and t != "crate":
            edges[m].add(t)

# Cycles: strongly connected components with more than one module.
index, low, stack, on, sccs, counter = {}, {}, [], set(), [], [0]


def strong(v):
    index[v] = low[v] = counter[0]
    counter[0] += 1
    stack.append(v)
    on.add(v)
    for w in edges[v]:
        if w not in index:
            strong(w)
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
            sccs.append(sorted(comp))


sys.setrecursionlimit(10000)
for v in sorted(edges):
    if v not in index:
        strong(v)
for m in sorted(edges):
    if edges[m]:
        print(f"{m} -> {', '.join(sorted(edges[m]))}")
if sccs:
    for c in sccs:
        print("CYCLE:", " <-> ".join(c))
    sys.exit(1)
print(f"no cycles among {len(files)} modules")
