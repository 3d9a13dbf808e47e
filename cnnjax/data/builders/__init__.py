"""cnnjax's own tfds builders: datasets generated offline from data that ships with a package.

Importing this package registers them with tfds (`tfds.builder('digits')` then works).
"""

from cnnjax.data.builders.digits import Digits

__all__ = ["Digits"]
