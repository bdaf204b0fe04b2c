"""Zoo models (RECIST-Net, the template segmenter) and their registry; empty until those issues land."""
