"""DeepLesion in its real on-disk format: DL_info.csv, 16-bit PNG slices, RECIST keypoint targets."""
