#!/usr/bin/env bash
# The SASS of the kernels, and how many global loads each kernel's hot path has in flight: for
# each kernel named, from its first 16-byte global load (the hot loop's first input), the loads
# issued before any instruction reads a register one of them fills, and their bytes. That count
# times the threads resident per SM is the bytes in flight per SM of docs/KERNELS.md ("Loads in
# flight").
#
#   scripts/kernel-sass.sh                      # every kernel of kernels/*.cu, sm_90
#   scripts/kernel-sass.sh fuse fuse_linear_bf16 # one file, one kernel; the full SASS too
#   SASS_ARCH=sm_80 scripts/kernel-sass.sh ...
#   SASS_ALL=1 scripts/kernel-sass.sh score      # every run of loads, not only the first (each
#                                                # dtype path of a kernel has its own)
#
# Compiles with build.rs's flags (-O3 -fmad=false) into a temporary cubin. Needs nvcc
# (scripts/install-nvcc.sh) and cuobjdump + nvdisasm, which this installs from PyPI with
# `pip install --target` into .cache/cuobjdump-13.2 when missing (PyPI has no 13.0 cuobjdump;
# 13.2 reads 13.0's cubins).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
arch="${SASS_ARCH:-sm_90}"
tools="$root/.cache/cuobjdump-13.2"
if [ ! -x "$tools/nvidia/cu13/bin/cuobjdump" ] || [ ! -x "$tools/nvidia/cu13/bin/nvdisasm" ]; then
    echo "kernel-sass.sh: installing cuobjdump and nvdisasm 13.2.51 into $tools" >&2
    tmp="$tools.tmp-$$"
    rm -rf "$tmp"
    PIP_ROOT_USER_ACTION=ignore "${PYTHON:-python3}" -m pip install --disable-pip-version-check \
        --no-warn-script-location --quiet --target "$tmp" \
        nvidia-cuda-cuobjdump==13.2.51 nvidia-cuda-nvdisasm==13.2.51 >&2
    rm -rf "$tools"
    mv "$tmp" "$tools"
fi
export PATH="$tools/nvidia/cu13/bin:$PATH"
nvcc="${NVCC:-$(bash "$here/install-nvcc.sh" 2>/dev/null)}"
out="$(mktemp -d "${TMPDIR:-/tmp}/stamerge-sass.XXXXXX")"
trap 'rm -rf "$out"' EXIT

files=("${1:-}")
[ -n "${1:-}" ] || files=(fuse score select)
for f in "${files[@]}"; do
    "$nvcc" -cubin -arch="$arch" -O3 -fmad=false -I "$root/kernels" "$root/kernels/$f.cu" \
        -o "$out/$f.cubin"
    cuobjdump -sass "$out/$f.cubin" > "$out/$f.sass"
    if [ -n "${2:-}" ]; then
        cuobjdump -sass -fun "$2" "$out/$f.cubin"
    fi
    python3 - "$out/$f.sass" "${2:-}" "${SASS_ALL:-}" <<'PY'
import re, sys
text = open(sys.argv[1]).read()
only = sys.argv[2]
all_runs = bool(sys.argv[3]) if len(sys.argv) > 3 else False
size = {"128": 16, "64": 8, "U8": 1, "S8": 1, "U16": 2, "S16": 2}
for m in re.finditer(r"Function : (\w+)\n(.*?)(?=\n\s*Function : |\Z)", text, re.S):
    name, body = m.group(1), m.group(2)
    if only and name != only:
        continue
    ins = re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", body)

    def run_from(start):
        """Loads issued from ins[start] on before an instruction reads one's result."""
        pending, loads, nbytes = set(), 0, 0
        for k in range(start, len(ins)):
            addr, t = ins[k]
            op = t.split()[0] if not t.startswith("@") else t.split()[1]
            regs = re.findall(r"\bR(\d+)\b", t)
            if op.startswith("LDG"):
                dst = int(regs[0])
                width = next((v for key, v in size.items() if f".{key}" in op), 4)
                if any(int(r) in pending for r in regs[1:]):  # an address from a loaded value
                    return loads, nbytes, k
                pending |= set(range(dst, dst + max(1, width // 4)))
                loads += 1
                nbytes += width
                continue
            writes_first = not op.startswith(("ST", "RED", "ATOM", "BRA", "BSYNC", "EXIT", "BAR",
                                              "CALL", "RET", "WARPSYNC", "ISETP", "FSETP"))
            srcs = [int(r) for r in (regs[1:] if writes_first else regs)]
            if any(r in pending for r in srcs):
                return loads, nbytes, k
        return loads, nbytes, None

    starts = [i for i, (_, t) in enumerate(ins) if re.search(r"\bLDG\.E\.128", t)]
    if not starts:
        print(f"{name:24} no 16-byte global load")
        continue
    shown, i = 0, 0
    while i < len(starts):
        loads, nbytes, stop = run_from(starts[i])
        where = f"first use at {ins[stop][0]}: {ins[stop][1].strip()[:52]}" if stop is not None else "no use"
        print(f"{name:24} {loads:2} loads, {nbytes:3} bytes issued before the first use of one ({where})")
        shown += 1
        if not all_runs:
            break
        # the next run: the first 16-byte load after this one's stop
        i = next((j for j in range(i + 1, len(starts)) if stop is None or starts[j] > stop), len(starts))
PY
done
