"""The ground floor: options (config), folders (paths), run folders (runs), atomic files, errors.

Everything else may import it; it imports nothing of seeds_tf above it.
"""
