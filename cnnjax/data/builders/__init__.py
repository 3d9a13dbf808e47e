"""cnnjax.data.builders."""
