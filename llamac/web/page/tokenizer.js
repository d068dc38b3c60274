// llamac tokenizer for the browser: reads tokenizer.web.json (written by llamac/web/tokenizer_web.py).
// Kinds: "spm-bpe" (sentencepiece BPE), "byte-bpe" (tiktoken-style byte-level BPE), "ids-only" (decode only).
// encode() never adds BOS; the page adds it, as llamac's Python runtime does.
"use strict";

(function (global) {
  function b64ToBytes(s) {
    const bin = atob(s);
    const out = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
    return out;
  }
  // A byte string as a JS string of code points 0..255: a cheap map key for byte sequences.
  function bytesKey(bytes) {
    let s = "";
    for (let i = 0; i < bytes.length; i++) s += String.fromCharCode(bytes[i]);
    return s;
  }

  class Tokenizer {
    constructor(spec) {
      this.spec = spec;
      this.kind = spec.kind;
      this.bosId = spec.bos_id;
      this.eosIds = spec.eos_ids || [];
      this.special = new Set(spec.special_ids || []);
      this.tokenBytes = spec.token_bytes.map(b64ToBytes);
      // sentencepiece byte pieces (<0x20>) and <unk> keep their leading space even first in the text
      this.noStrip = new Set();
      (spec.pieces || []).forEach(([, , type], id) => { if (type === 2 || type === 6) this.noStrip.add(id); });
      if (this.kind === "spm-bpe") this._initSpm(spec);
      if (this.kind === "byte-bpe") this._initByteBpe(spec);
    }

    static async load(url) {
      const resp = await fetch(url);
      if (!resp.ok) throw new Error("cannot fetch " + url + ": HTTP " + resp.status);
      return new Tokenizer(await resp.json());
    }

    canEncode() { return this.kind === "spm-bpe" || this.kind === "byte-bpe"; }

    encode(text) {
      if (this.kind === "spm-bpe") return this._encodeSpm(text);
      if (this.kind === "byte-bpe") return this._encodeByteBpe(text);
      throw new Error("this model's tokenizer cannot encode text in the browser; give token ids (ids:1,2,3)");
    }

    // ---- sentencepiece BPE: merge the adjacent pair whose joined piece has the highest score (leftmost on ties)
    _initSpm(spec) {
      this.pieceId = new Map();
      this.pieceScore = new Map();
      this.userDefined = [];
      spec.pieces.forEach(([piece, score, type], id) => {
        // 1 normal, 4 user-defined can come out of merges; control/unknown/unused/byte pieces cannot.
        if (type === 1 || type === 4) {
          this.pieceId.set(piece, id);
          this.pieceScore.set(piece, score);
        }
        if (type === 4) this.userDefined.push(piece);
        if (type === 6) {
          const m = /^<0x([0-9A-Fa-f]{2})>$/.exec(piece);
          if (m) (this.byteId || (this.byteId = new Map())).set(parseInt(m[1], 16), id);
        }
      });
      this.userDefined.sort((a, b) => b.length - a.length);
    }

    _encodeSpm(text) {
      const spec = this.spec;
      if (spec.remove_extra_whitespaces) text = text.trim().replace(/ +/g, " ");
      if (text.length === 0) return [];
      let norm = text.replace(/ /g, "\u2581");
      if (spec.add_dummy_prefix) norm = "\u2581" + norm;
      // Symbols: user-defined pieces whole, otherwise one code point each.
      const syms = [];
      const chars = Array.from(norm);
      for (let i = 0; i < chars.length;) {
        let matched = null;
        if (this.userDefined.length) {
          const rest = chars.slice(i).join("");
          matched = this.userDefined.find((u) => rest.startsWith(u)) || null;
        }
        if (matched) { syms.push(matched); i += Array.from(matched).length; }
        else { syms.push(chars[i]); i += 1; }
      }
      for (;;) {
        let best = -1, bestScore = -Infinity;
        for (let i = 0; i + 1 < syms.length; i++) {
          const score = this.pieceScore.get(syms[i] + syms[i + 1]);
          if (score !== undefined && score > bestScore) { best = i; bestScore = score; }
        }
        if (best < 0) break;
        syms.splice(best, 2, syms[best] + syms[best + 1]);
      }
      const ids = [];
      const enc = new TextEncoder();
      for (const s of syms) {
        const id = this.pieceId.get(s);
        if (id !== undefined) { ids.push(id); continue; }
        if (spec.byte_fallback && this.byteId) {
          for (const b of enc.encode(s)) ids.push(this.byteId.get(b));
        } else {
          ids.push(spec.unk_id);
        }
      }
      return ids;
    }

    // ---- byte-level BPE (tiktoken / Llama 3): regex pre-split, then merge the lowest-ranked byte pair
    _initByteBpe(spec) {
      this.encoder = new Map(spec.encoder.map(([b, id]) => [bytesKey(b64ToBytes(b)), id]));
      this.ranks = spec.ranks ? new Map(spec.ranks.map(([b, r]) => [bytesKey(b64ToBytes(b)), r])) : this.encoder;
      // Python's (?i:...) groups are supported by current Chromium; \p{..} needs the u flag.
      this.pattern = new RegExp(spec.pattern, "gu");
      this.cache = new Map();
    }

    _encodeByteBpe(text) {
      const ids = [];
      const enc = new TextEncoder();
      for (const m of text.matchAll(this.pattern)) {
        const word = bytesKey(enc.encode(m[0]));
        const whole = this.encoder.get(word);
        if (whole !== undefined) { ids.push(whole); continue; }
        let cached = this.cache.get(word);
        if (!cached) {
          const parts = Array.from(word);  // one char per byte
          while (parts.length > 1) {
            let best = -1, bestRank = Infinity;
            for (let i = 0; i + 1 < parts.length; i++) {
              const r = this.ranks.get(parts[i] + parts[i + 1]);
              if (r !== undefined && r < bestRank) { best = i; bestRank = r; }
            }
            if (best < 0) break;
            parts.splice(best, 2, parts[best] + parts[best + 1]);
          }
          cached = parts.map((p) => this.encoder.get(p));
          this.cache.set(word, cached);
        }
        ids.push(...cached);
      }
      return ids;
    }

    // ---- decoding: token bytes through a streaming UTF-8 decoder (characters split across tokens come out whole)
    // continues: the tokens follow text (a prompt), so a sentencepiece word keeps the space before it
    decoder(continues = false) {
      const tok = this;
      const utf8 = new TextDecoder("utf-8", { fatal: false });
      let first = !continues;
      return {
        put(id) {
          const bytes = tok.tokenBytes[id] || new Uint8Array(0);
          // Control tokens print as their text and do not end the start-of-text state (as in llamac's Python).
          if (tok.special.has(id)) return utf8.decode(bytes, { stream: true });
          let data = bytes;
          if (first && tok.spec.adds_dummy_prefix && data.length && data[0] === 0x20 && !tok.noStrip.has(id)) {
            data = data.subarray(1);  // the dummy-prefix space of the first text piece
          }
          first = false;
          return utf8.decode(data, { stream: true });
        },
        flush() { return utf8.decode(); },
      };
    }

    decode(ids) {
      const d = this.decoder();
      return ids.map((i) => d.put(i)).join("") + d.flush();
    }
  }

  global.LlamacTokenizer = Tokenizer;
  if (typeof module !== "undefined" && module.exports) module.exports = Tokenizer;
})(typeof window !== "undefined" ? window : globalThis);
