#!/usr/bin/env bash
# Fuzzes the tokenizer (tests/common/tokenizer/tokenizer_fuzz.cc) with libFuzzer under
# AddressSanitizer and UndefinedBehaviorSanitizer, built with clang outside the main build.
#
#   scripts/fuzz_tokenizer.sh          run for 60 seconds
#   scripts/fuzz_tokenizer.sh 600      run for 10 minutes
#   JOBS=4 scripts/fuzz_tokenizer.sh   run 4 fuzzing processes at once
#
# Needs clang-14 and libclang-rt-14-dev (Debian 12), plus the main build's libraries
# (libpcre2-dev, libutf8proc-dev, libabsl-dev, nlohmann-json3-dev). The corpus grows in
# build-fuzz/corpus, seeded with the reference strings; a crash leaves its input in build-fuzz/
# and the script fails.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-60}
jobs=${JOBS:-1}
out=build-fuzz
mkdir -p "$out/corpus"

CXX=${CXX:-clang++-14}
if ! command -v "$CXX" >/dev/null; then
  echo "fuzz_tokenizer: $CXX not found (apt-get install clang-14 libclang-rt-14-dev)"
  exit 2
fi

sources=(common/tokenizer/*.cc common/tokenizer/internal/*.cc tests/common/tokenizer/tokenizer_fuzz.cc)
binary="$out/tokenizer_fuzz"
if [ ! -x "$binary" ] || [ -n "$(find "${sources[@]}" common/tokenizer -newer "$binary" -print -quit)" ]; then
  echo "fuzz_tokenizer: building $binary"
  # shellcheck disable=SC2046
  "$CXX" -std=c++20 -O1 -g -fno-omit-frame-pointer \
    -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined \
    -I. -DCOHORT_SOURCE_DIR="\"$PWD\"" "${sources[@]}" -o "$binary" \
    $(pkg-config --cflags --libs libpcre2-8 libutf8proc absl_status absl_statusor absl_strings \
      absl_str_format absl_hash absl_raw_hash_set)
fi

# Seed the corpus with the reference strings (one file each) the first time.
if [ -z "$(ls -A "$out/corpus")" ]; then
  python3 - "$out/corpus" <<'PY'
import hashlib, json, pathlib, sys
for case in json.load(open("tests/fixtures/tokenizer/reference.json"))["cases"]:
    data = case["text"].encode()
    (pathlib.Path(sys.argv[1]) / hashlib.sha1(data).hexdigest()).write_bytes(data)
PY
fi

echo "fuzz_tokenizer: fuzzing for ${seconds}s with $jobs process(es)"
cd "$out"
parallel=()
# With -jobs libFuzzer writes each process's output to fuzz-N.log in build-fuzz/.
[ "$jobs" -gt 1 ] && parallel=(-jobs="$jobs" -workers="$jobs")
./tokenizer_fuzz -max_total_time="$seconds" -max_len=4096 -timeout=10 -rss_limit_mb=4096 \
  -print_final_stats=1 "${parallel[@]}" corpus
