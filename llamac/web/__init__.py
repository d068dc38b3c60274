"""The webgpu target: compile an export for browsers (build.py) and serve the page (serve.py).

Pieces, each with one job: graph edits for WGSL (int32.py, bools.py), ONNX -> Relax (relax_import.py), q4 weights
(q4.py), the GPU pipeline (schedule.py), TVM's wasm runtime from the wheel's sources (wasm_runtime.py, cxx/),
the JavaScript bundle (jsbundle.py), weight shards (shards.py), the tokenizer for the page (tokenizer_web.py),
and the page itself (page/).
"""
