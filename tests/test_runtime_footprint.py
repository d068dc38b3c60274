"""The runtime stays thin: loading and running a model imports nothing from the compiler, never onnx or torch,
and (for compiled artifacts) maps TVM's runtime library only, never libtvm_compiler."""
from __future__ import annotations

import json
import subprocess
import sys

from hf_models import CONFIGS, make_hf_checkpoint

from llamac.export.exporter import export

PROBE = """
import json, sys
from llamac.runtime import load
out = load(sys.argv[1]).generate([1, 5, 9, 13], max_new_tokens=4)
maps = open('/proc/self/maps').read()
print(json.dumps({"tokens": out.tokens, "modules": sorted(sys.modules),
                  "libs": sorted({l.split()[-1] for l in maps.splitlines() if '.so' in l})}))
"""

FORBIDDEN_MODULES = ("onnx", "torch", "transformers", "llamac.compiler", "llamac.export.exporter",
                     "llamac.export.graph", "llamac.quantize", "llamac.artifact")


def probe(path) -> dict:
    r = subprocess.run([sys.executable, "-c", PROBE, str(path)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.splitlines()[-1])


def check_thin(res: dict) -> None:
    bad = [m for m in res["modules"] if m.split(".")[0] in FORBIDDEN_MODULES or m in FORBIDDEN_MODULES
           or any(m.startswith(f + ".") for f in FORBIDDEN_MODULES)]
    assert not bad, bad
    assert not [lib for lib in res["libs"] if "libtvm_compiler" in lib or "libtvm.so" in lib]


def test_export_dir_backend_is_thin(tmp_path):
    make_hf_checkpoint(tmp_path / "hf", **CONFIGS["llama2_mha"])
    res = probe(export(tmp_path / "hf", tmp_path / "onnx", progress=False))
    assert len(res["tokens"]) == 4
    check_thin(res)
