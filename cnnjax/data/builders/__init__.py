"""cnnjax's own tfds builders: datasets generated offline from data that ships with a package.

Importing this package registers them with tfds (`tfds.builder('digits')` then works):
`digits` (scikit-learn's real 8x8 scans) and `shapes` (synthetic 32x32 RGB shapes).
"""

from cnnjax.data.builders.digits import Digits
from cnnjax.data.builders.shapes import Shapes

__all__ = ["Digits", "Shapes"]
