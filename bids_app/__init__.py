"""conus: spinal cord segmentation down to the conus medullaris, as a BIDS App."""

__version__ = "0.1.0"
