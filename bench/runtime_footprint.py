"""Import time and memory of the runtime on a compiled artifact (target: < 0.5 s and < 100 MB beyond the weights).

Usage: python bench/runtime_footprint.py ART [ART ...]   (default: the bundled model, compiled for this machine)
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

PROBE = """
import json, sys, time
t0 = time.perf_counter()
from llamac.runtime import load
t1 = time.perf_counter()
m = load(sys.argv[1])
t2 = time.perf_counter()
m.generate([1, 5, 9], max_new_tokens=8)
t3 = time.perf_counter()
status = dict(l.split(':', 1) for l in open('/proc/self/status').read().splitlines() if ':' in l)
maps = open('/proc/self/maps').read()
print(json.dumps({"import_s": t1 - t0, "load_s": t2 - t1, "first_generate_s": t3 - t2,
                  "rss_mb": int(status['VmRSS'].split()[0]) / 1024, "hwm_mb": int(status['VmHWM'].split()[0]) / 1024,
                  "libtvm_compiler_mapped": 'libtvm_compiler' in maps}))
"""


def main() -> None:
    arts = sys.argv[1:]
    if not arts:
        from llamac import bundled

        arts = [str(bundled.artifact())]
    for art in arts:
        manifest = json.load(open(os.path.join(art, "manifest.json")))
        weights_mb = manifest["files"]["weights.bin"]["size"] / 2**20
        # a baseline interpreter, so "beyond the weights" excludes Python itself
        base = subprocess.run([sys.executable, "-c", "import resource; print(resource.getrusage("
                               "resource.RUSAGE_SELF).ru_maxrss / 1024)"], capture_output=True, text=True)
        r = json.loads(subprocess.run([sys.executable, "-c", PROBE, art], capture_output=True, text=True,
                                      check=True).stdout)
        beyond = r["hwm_mb"] - weights_mb
        print(f"{art}: import llamac.runtime {r['import_s'] * 1000:.0f} ms, load {r['load_s']:.2f} s, first generate "
              f"{r['first_generate_s']:.2f} s; peak RSS {r['hwm_mb']:.0f} MB = weights {weights_mb:.0f} MB + "
              f"{beyond:.0f} MB (bare Python {float(base.stdout):.0f} MB); libtvm_compiler mapped: "
              f"{r['libtvm_compiler_mapped']}; load avg {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
