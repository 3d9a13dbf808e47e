"""The engine tests' subprocess environments name the session's shared compilation cache."""

from tests.conftest import CACHE_ENV

__all__ = ["CACHE_ENV"]
