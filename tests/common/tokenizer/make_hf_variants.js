// Records what Hugging Face `tokenizers` gives for variants of the demo tokenizer.json that use
// parts the demo does not (other pre-tokenizers, split behaviors, normalizers, added-token flags,
// decoders, post-processors), for tokenizer_variants_test.cc. Run by hand where npm works:
//
//   npm install --prefix /tmp/hf tokenizers@0.23.2
//   NODE_PATH=/tmp/hf/node_modules node tests/common/tokenizer/make_hf_variants.js \
//     > tests/common/tokenizer/hf_variants.json
//
// The npm package is the library's own Node binding (the same Rust code as the Python one).
const fs = require('fs');
const path = require('path');
const { Tokenizer } = require('tokenizers');

const root = path.join(__dirname, '..', '..', '..');
const demo = JSON.parse(fs.readFileSync(path.join(root, 'models/cohort-demo/tokenizer.json'), 'utf8'));

const byteLevel = (addPrefixSpace, useRegex) =>
  ({ type: 'ByteLevel', add_prefix_space: addPrefixSpace, trim_offsets: true, use_regex: useRegex });
const splitThenBytes = (pattern, behavior, invert) => ({
  type: 'Sequence',
  pretokenizers: [{ type: 'Split', pattern, behavior, invert }, byteLevel(false, false)],
});
const prependAndReplace = {
  type: 'Sequence',
  normalizers: [{ type: 'Prepend', prepend: '▁' }, { type: 'Replace', pattern: { String: ' ' }, content: '▁' }],
};
const addedToken = (content, flags) =>
  Object.assign({ id: 0, content, single_word: false, lstrip: false, rstrip: false, normalized: false, special: false }, flags);
const flaggedTokens = [
  addedToken('<tok>', { lstrip: true, rstrip: true, special: true }),
  addedToken('tok', { single_word: true, normalized: true }),
  addedToken('ab', { single_word: true, lstrip: true }),
  addedToken('abc', { rstrip: true, normalized: true }),
  addedToken('[MASK]', { lstrip: true, normalized: true, special: true }),
  addedToken('Ġthe', {}),
  addedToken('é', { normalized: true }),
];

// Each variant: a name, the top-level fields it replaces, fields it sets in "model", and
// added tokens it appends.
const variants = [
  { name: 'gpt2_byte_level', patch: { pre_tokenizer: byteLevel(false, true) } },
  { name: 'gpt2_byte_level_prefix_space', patch: { pre_tokenizer: byteLevel(true, true) } },
  { name: 'byte_level_prefix_space_no_regex', patch: { pre_tokenizer: byteLevel(true, false) } },
  { name: 'digits_individual', patch: { pre_tokenizer: { type: 'Sequence', pretokenizers: [{ type: 'Digits', individual_digits: true }, byteLevel(false, true)] } } },
  { name: 'digits_contiguous', patch: { pre_tokenizer: { type: 'Sequence', pretokenizers: [{ type: 'Digits', individual_digits: false }, byteLevel(false, true)] } } },
  { name: 'llama3_regex', patch: { pre_tokenizer: splitThenBytes({ Regex: "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+" }, 'Isolated', false) } },
  { name: 'oniguruma_shorthands', patch: { pre_tokenizer: splitThenBytes({ Regex: '\\w+|\\S|\\s|[\\s\\w]|\\h+|\\W' }, 'Isolated', false) } },
  { name: 'line_anchors', patch: { pre_tokenizer: splitThenBytes({ Regex: '^.|.$|\\d+' }, 'Isolated', false) } },
  { name: 'empty_matches', patch: { pre_tokenizer: splitThenBytes({ Regex: 'a*' }, 'MergedWithNext', false) } },
  { name: 'nfkc', patch: { normalizer: { type: 'NFKC' } } },
  { name: 'nfc', patch: { normalizer: { type: 'NFC' } } },
  { name: 'nfd', patch: { normalizer: { type: 'NFD' } } },
  { name: 'prepend_and_replace', patch: { normalizer: prependAndReplace } },
  { name: 'replace_regex', patch: { normalizer: { type: 'Replace', pattern: { Regex: '\\s+' }, content: ' ' } } },
  { name: 'no_decoder', patch: { decoder: null } },
  { name: 'decoder_sequence', patch: { decoder: { type: 'Sequence', decoders: [byteLevel(true, true)] } } },
  { name: 'ignore_merges', patch: {}, model_patch: { ignore_merges: true } },
  { name: 'template_sequence', patch: { post_processor: { type: 'Sequence', processors: [byteLevel(false, false), {
    type: 'TemplateProcessing',
    single: [{ SpecialToken: { id: 'B', type_id: 0 } }, { Sequence: { id: 'A', type_id: 0 } }, { SpecialToken: { id: 'E', type_id: 0 } }],
    pair: [],
    special_tokens: { B: { id: 'B', ids: [0, 3], tokens: ['a', 'b'] }, E: { id: 'E', ids: [1], tokens: ['c'] } } }] } } },
  { name: 'no_post_processor', patch: { post_processor: null } },
  { name: 'added_token_flags', patch: {}, added: flaggedTokens },
  { name: 'added_token_flags_nfkc_prepend', patch: { normalizer: { type: 'Sequence', normalizers: [{ type: 'NFKC' }, { type: 'Prepend', prepend: '▁' }] } }, added: flaggedTokens },
  { name: 'added_tokens_redefined_normalized', patch: { normalizer: prependAndReplace }, added: flaggedTokens.concat([
    addedToken('<｜User｜>', { normalized: true, special: true }),
    addedToken('[MASK] x', { normalized: true, special: true }),
    addedToken('<tok>', {}),
  ]) },
];
for (const behavior of ['Removed', 'Isolated', 'MergedWithPrevious', 'MergedWithNext', 'Contiguous']) {
  for (const invert of [false, true]) {
    variants.push({ name: `split_${behavior}${invert ? '_inverted' : ''}`, patch: { pre_tokenizer: splitThenBytes({ Regex: '\\s+' }, behavior, invert) } });
    variants.push({ name: `split_string_${behavior}${invert ? '_inverted' : ''}`, patch: { pre_tokenizer: splitThenBytes({ String: ' ' }, behavior, invert) } });
  }
}

const texts = [
  '', 'Hello, world!', '  leading and trailing  ', 'tabs\tand\nnewlines\r\n\r\n', 'a  b   c\u00a0d\u2009e\u3000f\u180eg\u0085h',
  "don't CAN'T We'LL I'm", '1234567890 12 345 ١٢٣٤ １２３ ² ½ Ⅻ', 'Größe façade naïve café e\u0301 ǟ',
  'ﬁ ｶﾞ ① ㈱ ™ Ａ Å', '日本語のテキストとカタカナ 中文汉字 한국어', '👨\u200d👩\u200d👧 🇫🇷 🙂x\u200dy',
  'snake_case __init__ x²y 3.14', 'hello_world! ¿qué? «quote» ‹a› — – …', 'line one\nline two\n\nline four ',
  '<｜User｜>hi<｜Assistant｜>hello<｜end▁of▁sentence｜>', '<think>reasoning</think>answer',
  ' <tok> a<tok>b <tok>', 'tok tok. atok tokb (tok)', 'ab xab ab. abc abcd abc  x', '[MASK] x  [MASK]x[MASK] x',
  'é e\u0301 Ġthe the', 'aaa baab aXa a', 'x\u0000y\u007fz\ufeff',
];

const out = { tokenizers_version: require('tokenizers/package.json').version, texts, variants: [] };
(async () => {
  for (const v of variants) {
    const json = JSON.parse(JSON.stringify(demo));
    Object.assign(json, JSON.parse(JSON.stringify(v.patch)));
    Object.assign(json.model, v.model_patch || {});
    if (v.added) json.added_tokens = json.added_tokens.concat(v.added);
    const tokenizer = Tokenizer.fromString(JSON.stringify(json));
    const results = [];
    for (const text of texts) {
      const plain = await tokenizer.encode(text, null, { addSpecialTokens: false });
      const special = await tokenizer.encode(text, null, { addSpecialTokens: true });
      const ids = Array.from(plain.getIds());
      results.push({
        ids,
        ids_with_special: Array.from(special.getIds()),
        decoded: await tokenizer.decode(ids, false),
        decoded_skip_special: await tokenizer.decode(ids, true),
      });
    }
    out.variants.push({ name: v.name, patch: v.patch, model_patch: v.model_patch || {}, added_tokens: v.added || [], results });
  }
  process.stdout.write(JSON.stringify(out) + '\n');
})();
