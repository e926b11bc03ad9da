#!/usr/bin/env bash
# What the GPU recipe suite (bench/gpu_recipes.py) needs on the GPU machine, which has no registry and no ../shared:
# .whl/ (wheels of the packages its image lacks, at the lock's versions) and .gpu/ (tokenizers and data copied from
# ../shared), both ignored by git and named in the device call's `carry` (64 MiB in all). Sets (default: all three):
#   recipes    deepspeed, jieba, bitsandbytes, liger-kernel; CSL, two novels, the Baichuan 1 and 2 tokenizers
#   serving    fastapi, uvicorn, openai, gradio (+ their needs)
#   embedding  faiss-cpu (19 MB)
#   scratch    data only: CSL ts_dev, LCSTS, 水浒传 (bench/from_scratch.py, bench/recipe_throughput.py)
# Three wheels are cut down to what runs there, to fit: bitsandbytes keeps its CUDA 13.0 and CPU libraries (the
# machine's torch is cu130; 43 -> ~3 MB), jieba its dictionary and HMM (no POS tagger or keyword models; 19 -> ~4 MB),
# gradio drops its server-side-rendering node bundle and example media (31 -> ~20 MB).
set -euo pipefail
[ $# -gt 0 ] || set -- recipes serving embedding
cd "$(git rev-parse --show-toplevel)"
for d in /.whl/ /.gpu/; do grep -qx "$d" .git/info/exclude 2>/dev/null || echo "$d" >> .git/info/exclude; done
rm -rf .whl .gpu && mkdir -p .whl .gpu/tokenizers .gpu/data/csl .gpu/data/novels
shared=../shared
cp -r "$shared/assets/tokenizers/baichuan1" "$shared/assets/tokenizers/baichuan2" .gpu/tokenizers/
cp "$shared/data/csl/clge_val.tsv" .gpu/data/csl/
cp "$shared/data/novels/xiyouji.txt" "$shared/data/novels/hongloumeng.txt" .gpu/data/novels/

lock() { grep -ihE "^${1//[-_]/[-_]}==" constraints.txt requirements-gpu.txt | head -1; }
bin=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
     --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
get() { for p in "$@"; do python3 -m pip download -q --no-deps "${bin[@]}" -d .whl "$(lock "$p")"; done; }
build() { for p in "$@"; do python3 -m pip wheel -q --no-deps -w .whl "$(lock "$p")"; done; }
prune() {  # prune WHEEL KEEP_REGEX: drop files not matching from the wheel, and their RECORD lines
  python3 - "$@" <<'EOF'
import re, sys, zipfile
path, keep = sys.argv[1], re.compile(sys.argv[2])
with zipfile.ZipFile(path) as z:
    items = [(i, z.read(i)) for i in z.infolist()]
kept = [(i, data) for i, data in items if keep.search(i.filename) or ".dist-info/" in i.filename]
names = {i.filename for i, _ in kept}
with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
    for i, data in kept:
        if i.filename.endswith(".dist-info/RECORD"):
            data = "".join(l + "\n" for l in data.decode().splitlines() if l.split(",")[0] in names).encode()
        z.writestr(i, data)
EOF
}

build jieba
prune .whl/jieba-*.whl '^jieba/(__init__|_compat|__main__)\.py$|^jieba/dict\.txt$|^jieba/finalseg/'
get pydantic pydantic_core annotated-types typing-inspection  # deepspeed's and fastapi's
for group in "$@"; do case $group in
  recipes)
    build deepspeed hjson
    get bitsandbytes liger-kernel
    prune .whl/bitsandbytes-*.whl '^bitsandbytes/(?!libbitsandbytes_(cuda(?!130)|rocm|xpu))' ;;
  embedding)  # Baichuan-Embedding's index
    get faiss-cpu ;;
  serving)
    get fastapi starlette uvicorn opentelemetry-api \
        openai jiter sniffio httpx2 httpcore2 truststore gradio gradio_client hf-gradio safehttpx groovy \
        orjson python-multipart tomlkit semantic-version brotli pydub pytz
    prune .whl/gradio-*.whl '^(?!gradio/(templates/node|media_assets)/)' ;;
  scratch)  # bench/from_scratch.py and bench/recipe_throughput.py: CSL ts_dev, LCSTS, the third novel (6.6 MB)
    mkdir -p .gpu/data/lcsts
    cp "$shared/data/lcsts/train.tsv" "$shared/data/lcsts/val.tsv" .gpu/data/lcsts/
    cp "$shared/data/csl/ts_dev.tsv" .gpu/data/csl/ && cp "$shared/data/novels/shuihuzhuan.txt" .gpu/data/novels/ ;;
  *) echo "unknown set $group (recipes, serving, embedding, scratch)" >&2; exit 2 ;;
esac; done
du -sh .whl .gpu
echo "carry: .whl .gpu (with the tracked files: $(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1) bytes)"
