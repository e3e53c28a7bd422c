import os
import sys

sys.path.insert(0, os.path.dirname(__file__))  # test helpers such as numpy_reference

# The tests run on CPU. With libtpu installed (the `tpu` extra, as in CI) JAX would otherwise probe
# for a TPU first (metadata-server queries, a machine-wide lock file); TPU compiles in the tests run
# in subprocesses against compile-only devices.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
