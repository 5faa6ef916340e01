"""Training, fine-tuning and export of conus models (imports TensorFlow; never imported by the CLI at start-up).

TensorFlow only uses its oneDNN kernels by default on some CPUs; on this project's AMD CPU they make
3D convolutions about 5x faster, so they are requested here before TensorFlow is first imported.
"""

import os

os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
