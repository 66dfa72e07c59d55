import os

# torchao tries to load CUDA-only kernels at import; on CPU that is noise only.
os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")

# Under pytest-xdist (the README's `-n 2`) each worker already has a core: one thread per worker, and per process
# it spawns (OMP_NUM_THREADS is inherited), instead of 2 threads each fighting over 2 cores.
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ.setdefault("OMP_NUM_THREADS", "1")

