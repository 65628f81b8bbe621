#!/usr/bin/env python3
"""Instruction counts of lavapipe's compiled kernels, from a callgrind run (kernel-profile.sh).

Wall times on a 2-core machine spread by ±20 % between runs; callgrind's counts of executed
x86 instructions (Ir) do not, so a change to a kernel can be judged by them. lavapipe's JIT
code has no symbols: callgrind names each kernel by its address. With the assembly that
GALLIVM_DEBUG=asm printed in the same run, the hottest kernel is annotated instruction by
instruction (offsets from the function's start match the listing's).

usage: kernel_profile.py CALLGRIND_OUT [ASM_LISTING ANNOTATED_OUT [RANK]]

RANK picks the kernel to annotate among the four listed (0, the default: the hottest).
"""
import collections
import re
import sys


def jit_costs(path):
    """Ir per instruction address, per function, of the code outside any object file (JIT)."""
    names, objs, costs = {}, {}, collections.defaultdict(collections.Counter)
    fn, ob, addr, skip = None, None, 0, False
    for line in open(path, errors="replace"):
        if line.startswith("positions:") and "instr" not in line:
            sys.exit(f"{path}: no instruction addresses; run callgrind with --dump-instr=yes")
        # callgrind names objects and functions once, "ob=(3) name", then by number alone;
        # "cob="/"cfn=" (a call's target) name them without making them current.
        m = re.match(r"c?(ob|fn)=\((\d+)\)(?: (.*))?", line)
        if m:
            kind, num, name = m.groups()
            table = objs if kind == "ob" else names
            if name:
                table[num] = name.strip()
            if line.startswith(kind):
                if kind == "ob":
                    ob = table.get(num, "")
                else:
                    fn = table.get(num, "")
            continue
        if line.startswith("calls="):
            skip = True  # the next line is the call's inclusive cost
            continue
        if not line[:1] or line[0] not in "0123456789+-*":
            continue
        parts = line.split()
        a = parts[0]
        if a.startswith("0x"):
            addr = int(a, 16)
        elif a[0] in "+-":
            step = int(a[1:], 16) if a[1:].startswith("0x") else int(a[1:])
            addr += step if a[0] == "+" else -step
        if skip:
            skip = False
            continue
        # JIT code: no object file ("???") and no symbol.
        if ob == "???" and fn and re.fullmatch(r"0x[0-9a-f]+", fn) and len(parts) >= 3:
            costs[fn][addr] += int(parts[-1])
    return costs


def listing(path):
    """The functions of a GALLIVM_DEBUG=asm listing: (name, {offset: instruction})."""
    funcs = []
    for line in open(path, errors="replace"):
        if re.match(r"^[A-Za-z_.]+:$", line.strip()) and not line.startswith(" "):
            funcs.append((line.strip()[:-1], {}))
            continue
        m = re.match(r"^\s*([0-9a-f]+):\t(.*)$", line)
        if m and funcs:
            funcs[-1][1][int(m.group(1), 16)] = m.group(2)
    return funcs


def main():
    costs = jit_costs(sys.argv[1])
    ranked = sorted(costs.items(), key=lambda kv: -sum(kv[1].values()))[:4]
    for fn, c in ranked:
        start = int(fn, 16)
        print(f"kernel at {fn}: {sum(c.values()):,} instructions, "
              f"entered {c.get(start, 0):,} times")
    if len(sys.argv) < 4 or not ranked:
        return
    fn, c = ranked[int(sys.argv[4]) if len(sys.argv) > 4 else 0]
    start = int(fn, 16)
    prof = {a - start: n for a, n in c.items()}
    funcs = listing(sys.argv[2])
    name, code = max(funcs, key=lambda f: sum(1 for o in prof if o in f[1]))
    total = sum(prof.values())
    ops = collections.Counter()
    with open(sys.argv[3], "w") as out:
        for off in sorted(code):
            n = prof.get(off, 0)
            ops[code[off].split()[0] if code[off].split() else ""] += n
            out.write(f"{n:12d}  {off:6x}: {code[off]}\n")
    matched = sum(n for o, n in prof.items() if o in code)
    print(f"annotated kernel = listing's {name} ({len(code)} instructions); "
          f"{100 * matched / total:.1f} % of its count mapped; annotated in {sys.argv[3]}")
    # A storage access whose address differs between SIMD lanes is a sequence per lane:
    # a test of the lane's bit in the execution mask, a bounds check, a scalar access.
    lanes = ops["testb"]
    print(f"per-lane mask tests (testb): {lanes:,} = {100 * lanes / total:.1f} % of instructions")
    print("top instructions:", ", ".join(f"{o} {100 * n / total:.1f} %" for o, n in ops.most_common(12)))


if __name__ == "__main__":
    main()
