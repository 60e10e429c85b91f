#!/usr/bin/env python3
"""Fails when the engine's modules import each other in a cycle.

Scans engine/src for paths between modules (`crate::x`, `super::x`, `self::x`, and a
file's own child modules named bare, as in `packed::path()`), leaving out comments,
strings and test code (`#[cfg(test)]` items). A module's `pub use` of its own children
is its namespace, not a use: a path through it counts as a use of that child.

The nodes are the crate's top-level modules, and one level down inside `quant` and
`model` (the decoder, its layers and their MLP, `model::layer` and `model::mlp`, which
loads through the decoder's `Loader`, refer to each other by design and count as one
node: `model`). Neither that graph nor the one of the top-level modules
alone may have a cycle. The crate root (`lib.rs`) only declares and re-exports, and is
left out.

Usage: tools/module-cycles.py [--graph] [SRC_DIR]   (default: engine/src)
Exit status 1 lists every cycle found; --graph prints the edges.
"""

import re
import sys
from pathlib import Path

# Folders whose children are nodes of their own.
DEEP = {"quant", "model"}
# Nodes counted as another.
MERGE = {"model::layer": "model", "model::mlp": "model"}


def module_path(src: Path, f: Path):
    parts = list(f.relative_to(src).with_suffix("").parts)
    if parts[-1] == "mod":
        parts.pop()
    if parts == ["lib"]:
        return ()
    return tuple(parts)


def strip(text: str) -> str:
    """The code without comments, string and char literals."""
    out = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            i = n if j < 0 else j
        elif text.startswith("/*", i):
            depth, i = 1, i + 2
            while i < n and depth:
                if text.startswith("/*", i):
                    depth, i = depth + 1, i + 2
                elif text.startswith("*/", i):
                    depth, i = depth - 1, i + 2
                else:
                    i += 1
        elif c == "r" and re.match(r'r#*"', text[i:i + 8]) and not re.match(r"\w", text[i - 1:i] or " "):
            m = re.match(r'r(#*)"', text[i:])
            end = '"' + m.group(1)
            j = text.find(end, i + len(m.group(0)))
            i = n if j < 0 else j + len(end)
            out.append('""')
        elif c == '"':
            i += 1
            while i < n and text[i] != '"':
                i += 2 if text[i] == "\\" else 1
            i += 1
            out.append('""')
        elif c == "'" and re.match(r"'(\\.|\\u\{[0-9a-fA-F]+\}|[^\\'])'", text[i:i + 12]):
            m = re.match(r"'(\\.|\\u\{[0-9a-fA-F]+\}|[^\\'])'", text[i:i + 12])
            i += len(m.group(0))
            out.append("' '")
        else:
            out.append(c)
            i += 1
    return "".join(out)


def skip_item(code: str, i: int) -> int:
    """The end of the item starting at `i` (through its `;` or its balanced braces)."""
    n = len(code)
    while i < n and code[i] not in ";{":
        i += 1
    if i < n and code[i] == "{":
        depth = 0
        while i < n:
            if code[i] == "{":
                depth += 1
            elif code[i] == "}":
                depth -= 1
                if depth == 0:
                    return i + 1
            i += 1
    return i + 1


def drop_tests(code: str):
    """The code without `#[cfg(test)]` items, and the names of test-only child modules."""
    out, test_mods, i = [], set(), 0
    for m in re.finditer(r"#\[cfg\(test\)\]", code):
        if m.start() < i:
            continue
        out.append(code[i:m.start()])
        j = m.end()
        # Further attributes of the same item.
        while True:
            a = re.match(r"\s*#\[[^\]]*\]", code[j:])
            if not a:
                break
            j += a.end()
        d = re.match(r"\s*(?:pub(?:\([^)]*\))?\s+)?mod\s+(\w+)\s*;", code[j:])
        if d:
            test_mods.add(d.group(1))
        i = skip_item(code, j)
    out.append(code[i:])
    return "".join(out), test_mods


def split_group(s: str):
    """The items of a `{...}` use group (without the braces), split at top-level commas."""
    items, depth, cur = [], 0, []
    for c in s:
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
        if c == "," and depth == 0:
            items.append("".join(cur))
            cur = []
        else:
            cur.append(c)
    items.append("".join(cur))
    return [x.strip() for x in items if x.strip()]


def expand(tail: str):
    """Module paths (lists of segments) named by a path tail such as `a::b::{c, d::e}`."""
    m = re.match(r"((?:\w+\s*::\s*)*)(\{|\w+|\*)?", tail)
    segs = [s.strip() for s in m.group(1).split("::") if s.strip()]
    last = m.group(2)
    if last == "{":
        depth, j = 0, m.start(2)
        for k in range(j, len(tail)):
            if tail[k] == "{":
                depth += 1
            elif tail[k] == "}":
                depth -= 1
                if depth == 0:
                    break
        paths = []
        for item in split_group(tail[j + 1:k]):
            item = item.split(" as ")[0].strip()
            if item == "self":
                paths.append(segs)
            else:
                paths.extend(segs + p for p in expand(item))
        return paths or [segs]
    if last and last != "*":
        segs = segs + [last]
    return [segs]


def inline_modules(code: str):
    """(start, end, name) of each inline `mod name { ... }` block."""
    spans = []
    for m in re.finditer(r"(?<![\w$])mod\s+(\w+)\s*\{", code):
        spans.append((m.end() - 1, skip_item(code, m.end() - 1), m.group(1)))
    return spans


def references(code: str, here: tuple, children: set):
    """Absolute module paths (tuples) that `code` of module `here` refers to."""
    refs = []
    spans = inline_modules(code)
    for m in re.finditer(r"(?<![\w:$])(crate|super|self)\s*::", code):
        inner = tuple(name for (a, b, name) in spans if a < m.start() < b)
        base = [] if m.group(1) == "crate" else list(here + inner)
        if m.group(1) == "super":
            base = base[:-1]
        rest = code[m.end():]
        while True:
            s = re.match(r"\s*super\s*::", rest)
            if not s:
                break
            base = base[:-1]
            rest = rest[s.end():]
        for p in expand(rest):
            refs.append(tuple(base + p))
    for name in children:
        for _ in re.finditer(r"(?<![\w:])" + re.escape(name) + r"\s*::", code):
            refs.append(here + (name,))
    return refs


CHILD_USE = r"(?:^|(?<=[;}\s]))pub(?:\([^)]*\))?\s+use\s+(?:self\s*::\s*)?(\w+)\s*::([^;]*);"


def reexports(code: str, here: tuple, children: set):
    """Names that `here` re-exports from its children, mapped to the child's path, and the
    code without those re-exports."""
    names = {}

    def keep(m):
        if m.group(1) not in children:
            return m.group(0)
        for p in expand(m.group(2)):
            if p:
                names[p[-1]] = here + (m.group(1),)
        for a in re.finditer(r"\bas\s+(\w+)", m.group(2)):
            names[a.group(1)] = here + (m.group(1),)
        return ""

    return names, re.sub(CHILD_USE, keep, code)


def node_of(path: tuple, modules: set):
    if not path:
        return None
    node = path[0]
    if path[0] in DEEP and len(path) >= 2 and path[:2] in modules:
        node = "::".join(path[:2])
    return MERGE.get(node, node)


def cycles(graph: dict):
    """Every elementary cycle's node list (Johnson would be overkill: a DFS per start)."""
    found, seen = [], set()
    nodes = sorted(graph)

    def dfs(start, v, stack, on):
        for w in sorted(graph.get(v, ())):
            if w == start:
                cyc = stack[:]
                key = frozenset(cyc)
                if key not in seen:
                    seen.add(key)
                    found.append(cyc + [start])
            elif w not in on and w > start:
                on.add(w)
                stack.append(w)
                dfs(start, w, stack, on)
                stack.pop()
                on.discard(w)

    for s in nodes:
        dfs(s, s, [s], {s})
    return found


def main(argv):
    show = "--graph" in argv
    args = [a for a in argv if a != "--graph"]
    src = Path(args[0]) if args else Path(__file__).resolve().parent.parent / "engine/src"
    files = sorted(src.rglob("*.rs"))
    modules = {module_path(src, f) for f in files}
    code_of, test_only = {}, set()
    for f in files:
        here = module_path(src, f)
        code, tmods = drop_tests(strip(f.read_text()))
        code_of[here] = code
        test_only.update(here + (t,) for t in tmods)
    children_of, exported = {}, {}
    for here, code in code_of.items():
        children_of[here] = {
            m.group(1)
            for m in re.finditer(r"(?:^|[;}\s])(?:pub(?:\([^)]*\))?\s+)?mod\s+(\w+)\s*;", code)
        }
        exported[here], code_of[here] = reexports(code, here, children_of[here])

    def through(r: tuple, depth: int = 0) -> tuple:
        """`r` with a re-exported name placed in the child that defines it."""
        for k in range(len(r) - 1, 0, -1):
            child = exported.get(r[:k], {}).get(r[k])
            if child and depth < 8:
                return through(child + r[k:], depth + 1)
        return r

    graph = {}
    for here, code in code_of.items():
        if not here or any(here[: k + 1] in test_only for k in range(len(here))):
            continue
        me = node_of(here, modules)
        graph.setdefault(me, set())
        # Re-exported names that the module's own code uses.
        own = [c for n, c in exported[here].items() if re.search(rf"(?<![\w:]){n}\b", code)]
        for r in references(code, here, children_of[here]) + own:
            r = through(r)
            # A path into the crate root's own items (`crate::Result`) names no module.
            if r[:1] == ("test_util",):
                continue
            if r[:1] not in modules and r[:2] not in modules:
                continue
            to = node_of(r, modules)
            if to and to != me:
                graph[me].add(to)
    # The same graph with each folder as one node: no cycle there either.
    top = {}
    for v, ws in graph.items():
        a = v.split("::")[0]
        top.setdefault(a, set()).update(w.split("::")[0] for w in ws if w.split("::")[0] != a)
    if show:
        for v in sorted(graph):
            print(f"{v} -> {', '.join(sorted(graph[v])) or '(none)'}")
    found = cycles(graph) + [c for c in cycles(top) if c not in cycles(graph)]
    if found:
        print(f"module-cycles: {len(found)} import cycle(s) among the engine's modules:")
        for c in found:
            print("  " + " -> ".join(c))
        return 1
    if not show:
        print(f"module-cycles: no cycle among {len(graph)} engine modules ({len(top)} top-level)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
