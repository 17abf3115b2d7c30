"""Images and datasets: decoding, sources (files, URLs, data), split files, checks, tf.data pipelines."""
