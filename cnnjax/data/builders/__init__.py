"""cnnjax's own tfds builders: datasets generated offline from data that ships with a package.

Importing this package registers them with tfds (`tfds.builder('digits')` then works):
`digits` (scikit-learn's real 8x8 scans), `shapes` (synthetic 32x32 RGB shapes), `shapes_multi`
(64x64 scenes with boxes) and `shapes_segmentation` (the same scenes with per-pixel classes).
"""

from cnnjax.data.builders.digits import Digits
from cnnjax.data.builders.shapes import Shapes, ShapesMulti, ShapesSegmentation

#: The builders cnnjax generates offline on first use; every other tfds dataset must be prepared.
LOCAL_BUILDERS = (Digits, Shapes, ShapesMulti, ShapesSegmentation)

__all__ = ["LOCAL_BUILDERS", "Digits", "Shapes", "ShapesMulti", "ShapesSegmentation"]
