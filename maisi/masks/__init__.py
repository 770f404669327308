"""Masks that are not the user's: a database of real masks, MAISI's augmentation, lesion placement.

``maisi.generation.plan`` asks this package for a mask and knows nothing of how it was made.
"""
