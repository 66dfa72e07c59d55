import os

# torchao tries to load CUDA-only kernels at import; on CPU that is noise only.
os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")
