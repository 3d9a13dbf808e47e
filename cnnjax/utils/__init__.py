"""Small helpers shared across cnnjax: argument validation (`validation`), atomic writes and
directory kinds (`files`), one process per directory (`lock`), the entry points' flag parsing and
one-line errors (`cli`)."""
