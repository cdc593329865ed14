#!/usr/bin/env node
// Writes expected_llama2.json: for every string of strings.json, the ids Llama 2's tokenizer
// gives it (BOS first), from the npm package llama-tokenizer-js (its own encoder, with Llama's
// vocabulary and merges, which tests/data/llama2/ holds too; see tests/data/README.md).
//   node tests/data/tokenizer/reference_llama2.mjs /path/to/llama-tokenizer.js > tests/data/tokenizer/expected_llama2.json
import fs from 'fs';
import path from 'path';
import { pathToFileURL, fileURLToPath } from 'url';
const here = path.dirname(fileURLToPath(import.meta.url));
const tokenizer = (await import(pathToFileURL(path.resolve(process.argv[2])).href)).default;
const strings = JSON.parse(fs.readFileSync(path.join(here, 'strings.json'), 'utf-8'));
const out = strings.map(text => ({ text, llama2: tokenizer.encode(text) }));
process.stdout.write(JSON.stringify(out, null, 0).replace(/\},\{/g, '},\n{') + '\n');
