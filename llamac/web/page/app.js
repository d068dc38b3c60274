// llamac WebGPU page: loads the compiled model (model.wasm + weight shards) with tvmjs and generates text.
// Automation: fill #prompt / #max-tokens and click #generate, or call window.llamacGenerate({ids|prompt, ...});
// when a generation ends, window.llamacResult = {tokens, text, prompt_tokens, stop_reason, speeds...}.
// Failures set window.llamacError (and show the message on the page).
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  const S = {};  // page state: manifest, tvm, device, weights, tokenizer

  class UserError extends Error {}

  function showError(msg) {
    const box = $("error");
    box.textContent = msg;
    box.style.display = "block";
    window.llamacError = msg;
  }
  function status(msg) { $("status").textContent = msg; }
  const mb = (n) => (n / (1 << 20)).toFixed(1) + " MB";

  // ---------------------------------------------------------------- WebGPU: adapter, features, limits
  async function openDevice(manifest) {
    if (!("gpu" in navigator) || !navigator.gpu) {
      throw new UserError("This browser does not support WebGPU (navigator.gpu is missing). Use a recent " +
        "Chrome, Edge or Safari; on Linux, Chromium needs --enable-unsafe-webgpu (or chrome://flags).");
    }
    let adapter = null;
    try {
      adapter = await navigator.gpu.requestAdapter({ powerPreference: "high-performance" });
    } catch (e) { adapter = null; }
    if (!adapter) {
      throw new UserError("No WebGPU adapter is available: the browser has WebGPU but found no usable GPU " +
        "(GPU blocklisted, drivers missing, or WebGPU disabled; in Chromium try --enable-unsafe-webgpu).");
    }
    const needed = (manifest.target.requires_features || []);
    for (const f of needed) {
      if (!adapter.features.has(f)) {
        throw new UserError(`This model was compiled for f16 compute and needs the WebGPU feature '${f}', ` +
          "which this GPU/browser lacks. Compile an f32 or q4 build (llamac compile --target webgpu --quant q4) " +
          "or use a GPU/browser with shader-f16.");
      }
    }
    const lim = adapter.limits;
    const largest = manifest.web.params.largest_tensor_bytes;
    const maxBinding = Math.min(lim.maxStorageBufferBindingSize, lim.maxBufferSize);
    if (largest > maxBinding) {
      throw new UserError(`The model's largest weight tensor is ${mb(largest)}, but this GPU allows at most ` +
        `${mb(maxBinding)} per storage buffer (maxStorageBufferBindingSize/maxBufferSize). ` +
        "Use q4 quantization or a smaller model.");
    }
    const requiredLimits = {};
    for (const k of ["maxStorageBufferBindingSize", "maxBufferSize", "maxComputeWorkgroupStorageSize",
      "maxComputeInvocationsPerWorkgroup", "maxComputeWorkgroupSizeX", "maxStorageBuffersPerShaderStage"]) {
      if (k in lim) requiredLimits[k] = lim[k];
    }
    const device = await adapter.requestDevice({ requiredLimits, requiredFeatures: needed });
    device.lost.then((info) => {
      if (info.reason !== "destroyed") {
        showError(`The GPU device was lost (${info.reason}: ${info.message}). Reload the page to start again.`);
      }
    });
    device.addEventListener("uncapturederror", (ev) => showError("WebGPU error: " + ev.error.message));
    const info = adapter.info || {};
    return { adapter, device, adapterName: [info.vendor, info.architecture, info.description].filter((x) => x).join(" ") };
  }

  // ---------------------------------------------------------------- model loading
  async function load() {
    const tLoad = performance.now();
    const manifest = await (await fetch("manifest.json")).json();
    S.manifest = manifest;
    const c = manifest.config;
    $("model").textContent = `${c.num_hidden_layers} layers · hidden ${c.hidden_size} · vocab ${c.vocab_size}` +
      ` · ${manifest.quant} weights, f32 compute · context ${manifest.max_seq_len}`;
    if (manifest.tokenizer) S.tok = await LlamacTokenizer.load(manifest.tokenizer.file);
    if (!S.tok || !S.tok.canEncode()) $("prompt").value = "ids:" + (manifest.web.bos_token_id ?? 1);

    status("opening the GPU…");
    const { device, adapterName } = await openDevice(manifest);
    S.adapterName = adapterName;
    status("loading model.wasm…");
    const wasm = await (await fetch(manifest.web.wasm)).arrayBuffer();
    const tvm = await tvmjs.instantiate(new Uint8Array(wasm), tvmjs.createPolyfillWASI(), console.log);
    tvm.initWebGPU(device);
    S.tvm = tvm;
    tvm.beginScope();  // lives as long as the page: the VM, the weights and the logits buffer
    tvm.registerInitProgressCallback((r) => status(r.text));
    status("compiling GPU kernels…");
    await tvm.asyncLoadWebGPUPipelines(tvm.systemLib());
    S.dev = tvm.webgpu();
    S.vm = tvm.createVirtualMachine(S.dev);
    S.fmain = S.vm.getFunction("main");      // any number of new tokens (prefill)
    S.fdecode = S.vm.getFunction("decode");  // exactly one new token, compiled with static shapes

    const paramsUrl = new URL(manifest.web.params.dir + "/", location.href).href;
    const scope = "llamac-" + (manifest.files["params/tensor-cache.json"] || "").slice(0, 16);
    const cacheType = typeof caches === "undefined" ? "indexeddb" : "cache";  // Cache Storage needs a secure origin
    await tvm.fetchTensorCache(paramsUrl, S.dev, scope, cacheType);
    S.weights = manifest.web.weight_names.map((n) => {
      const t = tvm.tensorCacheGet(n);
      if (!t) throw new Error("weight missing from the tensor cache: " + n);
      return t;
    });
    const V = manifest.web.vocab_size;
    S.logitsCpu = tvm.empty([1, 1, V], "float32", tvm.cpu());
    S.loadSeconds = (performance.now() - tLoad) / 1000;
    status(`ready · ${adapterName || "WebGPU"} · loaded in ${S.loadSeconds.toFixed(1)} s`);
    $("generate").disabled = false;
  }

  // ---------------------------------------------------------------- one forward step
  // KV cache: the graph concatenates past and new keys/values (present = concat(past, new)); we keep the
  // presents of one step as the pasts of the next.
  function emptyKv() {
    const w = S.manifest.web;
    const kv = [];
    for (let i = 0; i < 2 * w.num_layers; i++) {
      kv.push(S.tvm.detachFromCurrentScope(S.tvm.empty([1, w.num_kv_heads, 0, w.head_dim], "float32", S.dev)));
    }
    return kv;
  }

  async function forward(sess, ids) {
    const tvm = S.tvm;
    const n = ids.length, total = sess.nPast + n;
    tvm.beginScope();
    try {
      const toGpu = (arr, shape) => {
        const cpu = tvm.empty(shape, "int32", tvm.cpu()).copyFrom(arr);
        return tvm.empty(shape, "int32", S.dev).copyFrom(cpu);
      };
      const inputIds = toGpu(Int32Array.from(ids), [1, n]);
      const mask = toGpu(new Int32Array(total).fill(1), [1, total]);
      const pos = toGpu(Int32Array.from({ length: n }, (_, i) => sess.nPast + i), [1, n]);
      const out = (n === 1 ? S.fdecode : S.fmain)(inputIds, mask, pos, ...sess.kv, ...S.weights);
      const logits = out.get(0);
      const next = [];
      for (let i = 0; i < sess.kv.length; i++) next.push(tvm.detachFromCurrentScope(out.get(1 + i)));
      S.logitsCpu.copyFrom(logits);
      await S.dev.sync();
      for (const t of sess.kv) t.dispose();
      sess.kv = next;
      sess.nPast = total;
      return S.logitsCpu.toArray().slice();
    } finally {
      tvm.endScope();
    }
  }

  // ---------------------------------------------------------------- sampling (greedy at temperature 0)
  function makeRng(seed) {  // xorshift32: reproducible per seed
    let x = (seed >>> 0) || 0x9e3779b9;
    return () => { x ^= x << 13; x >>>= 0; x ^= x >>> 17; x ^= x << 5; x >>>= 0; return x / 4294967296; };
  }
  function sample(logits, temperature, rng) {
    let best = 0;
    for (let i = 1; i < logits.length; i++) if (logits[i] > logits[best]) best = i;
    if (!(temperature > 0)) return best;
    let sum = 0;
    const p = new Float64Array(logits.length);
    for (let i = 0; i < logits.length; i++) { p[i] = Math.exp((logits[i] - logits[best]) / temperature); sum += p[i]; }
    let r = rng() * sum;
    for (let i = 0; i < p.length; i++) { r -= p[i]; if (r <= 0) return i; }
    return best;
  }

  // ---------------------------------------------------------------- generation
  function parsePrompt(text) {
    const m = /^\s*ids:\s*([\d,\s]+)$/.exec(text);
    if (m) return m[1].split(/[,\s]+/).filter((x) => x).map(Number);
    if (!S.tok || !S.tok.canEncode()) {
      throw new UserError("This model's tokenizer cannot encode text in the browser; enter token ids as ids:1,2,3");
    }
    const bos = S.manifest.web.bos_token_id;
    return (bos !== null && bos !== undefined ? [bos] : []).concat(S.tok.encode(text));
  }

  async function generate({ ids, prompt, maxNewTokens = 32, temperature = 0, seed = 0, returnLogits = false }) {
    if (!S.fmain) throw new UserError("the model is not loaded yet");
    const promptIds = ids ? ids.map(Number) : parsePrompt(prompt);
    const w = S.manifest.web, maxSeq = S.manifest.max_seq_len;
    if (promptIds.length === 0) throw new UserError("the prompt is empty");
    const bad = promptIds.find((i) => !(Number.isInteger(i) && i >= 0 && i < w.vocab_size));
    if (bad !== undefined) throw new UserError(`token id ${bad} is outside the vocabulary (0..${w.vocab_size - 1})`);
    if (promptIds.length > maxSeq) {
      throw new UserError(`the prompt has ${promptIds.length} tokens but the model was compiled for ${maxSeq}`);
    }
    window.llamacResult = undefined;
    const eos = new Set(w.eos_token_ids.concat(S.tok ? S.tok.eosIds : []));
    // after a prompt with text, the reply's first word keeps its space (prompt + text reads as written)
    const detok = S.tok ? S.tok.decoder(promptIds.some((i) => i < S.tok.tokenBytes.length && !S.tok.special.has(i)))
      : null;
    const rng = makeRng(seed);
    const sess = { kv: emptyKv(), nPast: 0 };
    const outEl = $("output");
    outEl.textContent = "";
    const tokens = [];
    let text = "", reason = "length";
    try {
      const t0 = performance.now();
      let logits = await forward(sess, promptIds);
      const t1 = performance.now();
      const firstLogits = returnLogits ? Array.from(logits) : undefined;  // for tests: compare with a reference
      for (let n = 0; n < maxNewTokens; n++) {
        const tok = sample(logits, temperature, rng);
        if (eos.has(tok)) { reason = "eos"; break; }
        tokens.push(tok);
        const piece = detok ? detok.put(tok) : "";
        text += piece;
        outEl.textContent += piece;
        const dt = (performance.now() - t1) / 1000;
        $("stats").textContent = `${tokens.length} tokens · decode ${(tokens.length > 1 ? (tokens.length - 1) / dt : 0).toFixed(1)} tok/s`;
        if (n + 1 === maxNewTokens) break;
        if (sess.nPast >= maxSeq) { reason = "context"; break; }
        logits = await forward(sess, [tok]);
      }
      if (detok) { const tail = detok.flush(); text += tail; outEl.textContent += tail; }
      const t2 = performance.now();
      const prefillS = (t1 - t0) / 1000, decodeS = (t2 - t1) / 1000;
      const result = {
        prompt_tokens: promptIds, tokens, text, stop_reason: reason,
        prefill_s: prefillS, decode_s: decodeS,
        prefill_tok_s: prefillS > 0 ? promptIds.length / prefillS : 0,
        decode_tok_s: decodeS > 0 && tokens.length > 1 ? (tokens.length - 1) / decodeS : 0,
        adapter: S.adapterName, load_s: S.loadSeconds,
      };
      if (firstLogits) result.first_logits = firstLogits;
      $("stats").textContent = `prompt ${promptIds.length} tokens: ${result.prefill_tok_s.toFixed(1)} tok/s · ` +
        `generated ${tokens.length} tokens: ${result.decode_tok_s.toFixed(1)} tok/s · stop: ${reason}`;
      window.llamacResult = result;
      return result;
    } finally {
      for (const t of sess.kv) t.dispose();
    }
  }

  async function onGenerateClick() {
    const btn = $("generate");
    btn.disabled = true;
    window.llamacError = undefined;
    $("error").style.display = "none";
    try {
      await generate({
        prompt: $("prompt").value,
        maxNewTokens: Math.max(1, parseInt($("max-tokens").value, 10) || 1),
        temperature: parseFloat($("temperature").value) || 0,
        seed: parseInt($("seed").value, 10) || 0,
      });
    } catch (e) {
      showError(e instanceof UserError ? e.message : "Generation failed: " + (e && e.stack || e));
    } finally {
      btn.disabled = false;
    }
  }

  window.llamacGenerate = generate;
  window.addEventListener("DOMContentLoaded", () => {
    $("generate").addEventListener("click", onGenerateClick);
    load().then(() => { window.llamacReady = true; }).catch((e) => {
      status("");
      showError(e instanceof UserError ? e.message : "Loading the model failed: " + (e && e.stack || e));
    });
  });
})();
