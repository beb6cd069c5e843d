"""imret: train apparel image-retrieval models on many GPUs and measure which retrieves best."""

__version__ = "0.1.0"
